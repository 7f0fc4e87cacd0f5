"""The README's demo runs every op of this build against its reference (no timing is asserted)."""

from h1r_ops import demo


def test_demo_runs_every_op_close_to_its_reference():
    rows = demo.run(quick=True, reps=1)
    assert len(rows) >= 6
    for name, err, _, _ in rows:
        assert err is not None, f"{name}: op missing from this build"
        # fp32 cases to 1e-3; the bf16 ones to one bf16 ulp of values ~4; sampled tokens exactly (err 0)
        assert err < (0.05 if "bf16" in name else 1e-3), f"{name}: max |err| {err}"
