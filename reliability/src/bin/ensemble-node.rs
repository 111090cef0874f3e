//! `ensemble-node master|worker`: one binary that runs either service, for the reliability
//! tests (which need real processes to `kill -9` and SIGTERM).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let role = reliability::Role::parse(std::env::args().nth(1).as_deref())?;
    reliability::run(role).await
}
