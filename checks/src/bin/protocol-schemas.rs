//! Writes the worker protocol's JSON Schemas from the Rust types: `docs/schemas/<Type>.json`
//! (draft 2020-12), the schema blocks of `docs/worker-protocol.md`, and the protocol's
//! components of `master/openapi.json`. Run it after changing a type in `common::wire`:
//!
//!   cargo run -p checks --bin protocol-schemas
//!
//! `tests/protocol_schemas.rs` fails until it has been run.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let root = checks::protocol::workspace_root();
    let mut changed = 0;
    for output in checks::protocol::generate(&root)? {
        let path = root.join(&output.path);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(output.contents.as_str()) {
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("could not create {}", dir.display()))?;
        }
        std::fs::write(&path, &output.contents)
            .with_context(|| format!("could not write {}", path.display()))?;
        println!("wrote {}", output.path.display());
        changed += 1;
    }
    println!("{changed} file(s) changed");
    Ok(())
}
