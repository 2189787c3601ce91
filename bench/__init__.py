"""ISP Bench: benchmark harness (config, runner, worker, reports) for isp_core."""
