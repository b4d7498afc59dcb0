//! The guest agent binary: parse the command line, set up init duties when PID 1, serve.

use carrel_guest_agent::config::USAGE;
use carrel_guest_agent::{pid1, Agent, AgentConfig};

fn main() {
    let pid1 = pid1::is_pid1();
    if let Err(error) = run(pid1) {
        eprintln!("carrel-guest-agent: {error:#}");
        if pid1 {
            pid1::power_off();
        }
        std::process::exit(1);
    }
}

fn run(pid1: bool) -> anyhow::Result<()> {
    let mut config = AgentConfig::parse(std::env::args().skip(1))?;
    if config.help {
        print!("{USAGE}");
        return Ok(());
    }
    config.pid1 = pid1;
    if pid1 {
        pid1::mount_early_filesystems()?;
        if std::env::var_os("PATH").is_none() {
            // The kernel starts init with an almost empty environment; commands expect a
            // PATH. Set before any thread exists.
            std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        }
    }
    let agent = Agent::new(&config)?;
    eprintln!(
        "carrel-guest-agent: serving{}{}{}",
        config.unix.as_ref().map(|path| format!(" unix:{}", path.display())).unwrap_or_default(),
        config.vsock_port.map(|port| format!(" vsock:{port}")).unwrap_or_default(),
        config.root.as_ref().map(|root| format!(" (files confined to {})", root.display())).unwrap_or_default(),
    );
    agent.run(&config)?;
    Ok(())
}
