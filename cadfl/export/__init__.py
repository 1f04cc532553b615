"""`cadfl export`: a device's context model as one standalone file for mobile inference.

For a CAD (or Fed2) checkpoint the file holds the context sub-model of the chosen classes: the
trunk plus only those classes' paths, physically smaller (`cadfl.cad.submodel.extract`). For a
dense checkpoint (FedAvg and friends) it holds the whole network with only those classes'
logits, for comparison. Either way the file takes uint8 images N x H x W x C, as a camera or
an image decoder delivers them, normalises them inside the graph with the run's dataset
statistics, and returns one logit per context class in the order its metadata lists, next to
the class names, the checkpoint's SHA-256 and the model spec.

Every ONNX file is run in onnxruntime (CPU execution provider) before it is written, and its
logits are compared with the PyTorch model's on real test images of the context classes and
on random images; a difference above `TOLERANCE` stops the export. `--int8` quantises with
onnxruntime's static post-training quantisation, calibrated on training images of the context
classes, and reports the accuracy change; `--report` measures size, parameters, multiply-adds,
onnxruntime latency (one thread, batch 1, the full model's file and the context file side by
side) and context accuracy.
"""

