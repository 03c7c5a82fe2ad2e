"""tests/budget.py: the table flags a notebook that is too slow or uses too much memory."""

from tests.budget import BUDGET_BYTES, BUDGET_SECONDS, format_table


def test_budget_table_flags_time_and_memory():
    fine = {"start": 0.0, "end": 100.0, "peak": 2**30, "child_peak": 0, "together": 2**30, "failed": False}
    slow = dict(fine, end=BUDGET_SECONDS + 1.0)
    big_kernel = dict(fine, peak=BUDGET_BYTES + 1)
    big_together = dict(fine, child_peak=2**29, together=BUDGET_BYTES + 1)  # kernel + server at once
    failed = dict(fine, failed=True)
    rows = format_table({"a.ipynb": fine, "b.ipynb": slow, "c.ipynb": big_kernel,
                         "d.ipynb": big_together, "e.ipynb": failed}).splitlines()[2:]
    assert rows[0] == "| a.ipynb | 100 s | 1.00 GiB | no children | yes |"
    assert [r.split("|")[-2].strip() for r in rows[1:]] == ["NO", "NO", "NO", "yes (a cell failed)"]
    assert "2.00 GiB" in rows[3]
