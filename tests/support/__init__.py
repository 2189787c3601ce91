"""Helpers shared by the tests: the gloo process harness, case functions run on ranks, a stand-in worker, run-folder factories."""
