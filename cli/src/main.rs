//! The `ensemble` command (placeholder until the launcher lands).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
