//! The `ensemble-bench` binary: parses its flags, runs the selected benchmarks and prints
//! one table.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = bench::Args::parse();
    let report = bench::run(&args).await?;
    println!("{}", report.render());
    Ok(())
}
