"""The summary keys a simulated run reports (`cascade bench sim --json`, `SimReport.summary()`),
written out here rather than imported from the package, so a renamed key fails the tests."""

SIM_SUMMARY_KEYS = {
    "mean_e2e_s",
    "p99_e2e_s",
    "mean_ttft_s",
    "p99_ttft_s",
    "mean_tpot_s",
    "p99_tpot_s",
    "throughput_tok_s",
    "completed",
    "migrations",
    "prefix_cache_hit_rate",
    "sim_wall_s",
}
