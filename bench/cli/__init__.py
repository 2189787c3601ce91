"""Command-line front ends: argument parsing only; the logic lives in the stage packages."""
