"""Run summaries: the health flag of an algorithm's run."""

from cadfl.report.summary import health, markdown_table, summarize


def _line(rnd: int, global_acc: float | None, rejected: int = 0,
          context_acc: float | None = 0.5) -> dict:
    return {"round": rnd, "algorithm": "a", "global_acc": global_acc,
            "context_acc": context_acc, "rejected": rejected, "bytes_down": 0, "bytes_up": 0,
            "device_train_flops": 0.0, "wall_s": 1.0}


def test_a_run_that_stays_near_its_best_without_rejections_is_ok():
    assert health([_line(1, 0.30), _line(2, 0.50), _line(3, 0.46)]) == "ok"  # 4 points


def test_a_fall_from_the_best_and_rejected_updates_are_flagged_with_their_rounds():
    lines = [_line(1, 0.30), _line(2, 0.52), _line(3, None), _line(4, 0.40, rejected=2),
             _line(5, 0.10, rejected=10)]
    assert health(lines) == ("updates rejected from round 4; last global 42.0 points below "
                             "its best (round 2)")


def test_without_a_global_model_the_context_accuracy_is_judged():
    lines = [_line(1, None, context_acc=0.9), _line(2, None, context_acc=0.8)]
    assert health(lines) == "last context 10.0 points below its best (round 1)"


def test_the_summary_table_carries_the_flag():
    rows = summarize([_line(1, 0.6), _line(2, 0.3)], 0.5, 10)
    assert rows[0]["health"] == "last global 30.0 points below its best (round 1)"
    assert markdown_table(rows).splitlines()[0].endswith("| health |")
