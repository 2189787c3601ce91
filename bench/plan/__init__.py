"""The planner: predict memory, communication and step time of ISP layouts and their peers on any
cluster without launching anything, and check those predictions against measured runs.

hardware.py   hardware files (device memory, compute peaks or calibrated rates, links)
links.py      seconds per collective: measured curves or alpha-beta on the links a group spans
compute.py    seconds per piece of compute from FLOPs/bytes and rates
memory.py     peak memory per rank by component
isp_schedule.py, peer_schedule.py   the operations of one step, checked against isp_core's formulas
replay.py     the event-level replay on compute and communication streams
predict.py    one cell's prediction; planner.py all cells plus peers, ranked; render.py output
calibrate.py  a hardware file for this machine; validate.py predictions against runs
See docs/plan.md.
"""
