//! Helpers for the smoke tests: bench flags for a tiny in-process run.

use clap::Parser;

/// `ensemble-bench --quick --runs 1` plus `extra`, services in this process.
pub fn tiny_args(extra: &[&str]) -> bench::Args {
    let mut argv = vec!["ensemble-bench", "--quick", "--runs", "1"];
    argv.extend_from_slice(extra);
    bench::Args::try_parse_from(argv).expect("valid flags")
}
