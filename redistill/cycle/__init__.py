"""The cycle's library steps: its inputs and idempotency key, earlier decisions and recovery, warm starts,
workspace bootstrap, the committed champion, gate calibration, reproduction and the demo.

May import: everything below it (config … registry); never tasks/ or flows/.
"""
