"""The device side: payloads and a device's data in, updates out, on a compute device.

`train` is the one local SGD loop every device runs, `score` the one scoring of a model's
logits restricted to a device's classes, `precision` how the model computes, `compute` the
compute device (CPU or CUDA), `store` what each device keeps between rounds (by layer and
class path), `executor` runs a round's jobs one by one or in same-shape batches (`batched`).
The Flower ClientApp is the same device side on a Flower node.
"""
