"""`cascade calibrate`: measure an engine's step time over a grid of batch compositions and fit
the cost profile (docs/design/cost-model.md, "Calibration").

grid.py chooses the batches, measure.py holds each one on an engine and times its steps through
a probe (vllm_probe.py for vLLM, sim_probe.py for the simulator), fit.py fits the six timing
terms and reports the error, profile.py writes and checks the JSON, session.py runs it all.
"""
