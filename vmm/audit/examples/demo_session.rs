//! Writes a small demo session: one event per image given, each image stored as the
//! screenshot after its event (and the previous one as the screenshot before), then a
//! checkpoint. For trying `carrel-audit show`, `verify` and `replay` by hand.
//!
//! `cargo run -p carrel-audit --example demo_session -- DIR IMAGE...`

use std::path::PathBuf;

use carrel_audit::{Actor, AuditLog, NewEvent, Outcome};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("usage: demo_session DIR IMAGE..."))?);
    let log = AuditLog::open(&dir, "demo-vm")?;
    let actions = ["input.click", "input.type", "agent.exec", "screenshot"];
    let mut before = None;
    for (i, image) in args.enumerate() {
        let after = *log.put_blob(&std::fs::read(&image)?)?.as_bytes();
        let action = actions[i % actions.len()];
        let mut event = NewEvent::new(action).actor(Actor { pid: 4242, uid: 1000, gid: 1000 });
        event = match action {
            "input.click" => event.param("x", (100 + 40 * i).to_string()).param("y", "200"),
            "input.type" => event.param("text", "hello <b>world</b>").param("password", "hunter2"),
            "agent.exec" => event.param("command", "ls -l /tmp").outcome(Outcome::Error("exit status 2".into())),
            _ => event,
        };
        log.append(event.screenshots(before, Some(after)))?;
        before = Some(after);
    }
    let checkpoint = log.checkpoint()?;
    println!("{} events in {}; checkpoint size {}", log.size(), dir.display(), checkpoint.checkpoint.tree_size);
    Ok(())
}
