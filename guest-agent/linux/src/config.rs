//! Command-line configuration of the agent binary.

use std::path::PathBuf;
use std::time::Duration;

use carrel_agent_proto::{AGENT_VSOCK_PORT, HEARTBEAT_INTERVAL_MS};

/// Usage text for `--help` and argument errors.
pub const USAGE: &str = "\
usage: carrel-guest-agent [--unix PATH] [--vsock-port N] [--root DIR] [--heartbeat-ms N]

  --unix PATH        listen on a Unix socket (tests, running on a host)
  --vsock-port N     listen on AF_VSOCK port N (default 1024 when --unix is not given)
  --root DIR         confine file requests to DIR
  --heartbeat-ms N   heartbeat interval (default 1000)
";

/// Errors in the command line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag} needs a value\n{USAGE}")]
    ReadValue { flag: String },
    #[error("{flag} value {value:?} is not a valid number\n{USAGE}")]
    ParseNumber { flag: String, value: String },
    #[error("unknown argument {argument:?}\n{USAGE}")]
    ParseArgument { argument: String },
}

/// How the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub unix: Option<PathBuf>,
    pub vsock_port: Option<u32>,
    pub root: Option<PathBuf>,
    pub heartbeat_interval: Duration,
    /// Running as PID 1: mount the early filesystems and reap every child.
    pub pid1: bool,
    /// `--help` was given.
    pub help: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            unix: None,
            vsock_port: None,
            root: None,
            heartbeat_interval: Duration::from_millis(HEARTBEAT_INTERVAL_MS),
            pid1: false,
            help: false,
        }
    }
}

impl AgentConfig {
    /// Parses the arguments after the program name. With no listener given, the agent
    /// listens on vsock port 1024.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<AgentConfig, ConfigError> {
        let mut config = AgentConfig::default();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| ConfigError::ReadValue { flag: flag.clone() });
            match flag.as_str() {
                "--unix" => config.unix = Some(PathBuf::from(value()?)),
                "--vsock-port" => config.vsock_port = Some(parse_number(&flag, value()?)?),
                "--root" => config.root = Some(PathBuf::from(value()?)),
                "--heartbeat-ms" => {
                    let ms: u64 = parse_number(&flag, value()?)?;
                    config.heartbeat_interval = Duration::from_millis(ms.max(10));
                }
                "-h" | "--help" => config.help = true,
                _ => return Err(ConfigError::ParseArgument { argument: flag }),
            }
        }
        if config.unix.is_none() && config.vsock_port.is_none() {
            config.vsock_port = Some(AGENT_VSOCK_PORT);
        }
        Ok(config)
    }
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: String) -> Result<T, ConfigError> {
    value.parse().map_err(|_| ConfigError::ParseNumber { flag: flag.to_string(), value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(args.iter().map(|arg| arg.to_string()))
    }

    #[test]
    fn parse_nothing_listens_on_vsock_1024() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.vsock_port, Some(1024));
        assert_eq!(config.unix, None);
    }

    #[test]
    fn parse_unix_and_root_sets_both_without_vsock() {
        let config = parse(&["--unix", "/tmp/a.sock", "--root", "/srv", "--heartbeat-ms", "50"]).unwrap();
        assert_eq!(config.unix, Some(PathBuf::from("/tmp/a.sock")));
        assert_eq!(config.root, Some(PathBuf::from("/srv")));
        assert_eq!(config.vsock_port, None);
        assert_eq!(config.heartbeat_interval, Duration::from_millis(50));
    }

    #[test]
    fn parse_bad_input_returns_errors() {
        assert!(matches!(parse(&["--unix"]), Err(ConfigError::ReadValue { .. })));
        assert!(matches!(parse(&["--vsock-port", "x"]), Err(ConfigError::ParseNumber { .. })));
        assert!(matches!(parse(&["--bogus"]), Err(ConfigError::ParseArgument { .. })));
    }
}
