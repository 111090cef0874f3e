//! `ensemble up`: start the system, print where everything is and how to use it, run until
//! ctrl-c or SIGTERM (a second one quits at once).

use std::process::ExitCode;

use crate::args::LaunchArgs;
use crate::launcher::{Store, System};

/// `ensemble up`.
pub async fn run(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let shutdown = common::shutdown::on_signal();
    let system = tokio::select! {
        started = System::start(&args) => started?,
        () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
    };
    print_banner(&system);
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        eprintln!(
            "stopping: workers finish what they hold, then the master and the gateway \
             (ctrl-c again to quit now)"
        );
    });
    system.run_until(shutdown).await?;
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn print_banner(system: &System) {
    let key = &system.api_key;
    let master = &system.master_url;
    say!("Ensemble is up. Press ctrl-c to stop.");
    say!();
    say!(
        "  llm-gateway      {}  (provider: {})",
        system.gateway_url,
        system.provider
    );
    say!("  master           {master}");
    for (capability, url) in &system.workers {
        say!("  worker {capability:<9} {url}");
    }
    say!("  store            {}", system.store);
    say!("  API key          {key}  (client and operator)");
    if matches!(system.store, Store::Memory) {
        say!();
        say!("  NOTE: no Redis: tasks are lost when this stops, and the workers cannot register");
        say!("  or heartbeat (the launcher tells the master about them; leases last 5 minutes).");
    }
    say!();
    say!("Try, in another shell:");
    say!("  export ENSEMBLE_URL={master} ENSEMBLE_API_KEY={key}");
    say!("  ensemble submit --input '{{\"question\": \"What is Ensemble?\"}}' --wait");
    say!("  ensemble workers; ensemble queues");
    say!("  curl -H 'Authorization: Bearer {key}' {master}/queues");
}
