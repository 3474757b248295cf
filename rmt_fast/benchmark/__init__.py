"""The pieces of ``rmt-fast bench`` (rmt_fast/bench.py is its command line): memory measures, the models,
the workloads, timing one point of each system, and the report (table, JSON, plots)."""
