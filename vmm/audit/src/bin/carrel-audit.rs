//! `carrel-audit`: look at, prove from, checkpoint, replay, export and verify an audit log
//! directory. `verify` works on a copy, offline, and trusts nothing the host computed.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use carrel_audit::checkpoint::{latest_checkpoint, parse_public_key, read_public_key};
use carrel_audit::codec::to_hex;
use carrel_audit::export::{event_json, export_jsonl, format_time};
use carrel_audit::layout::Layout;
use carrel_audit::reader::{for_each_event, for_each_record};
use carrel_audit::replay::write_replay;
use carrel_audit::tree::{self, NodeSource};
use carrel_audit::tree_store::TreeStore;
use carrel_audit::{error_chain, verify_dir, AuditConfig, AuditLog, Outcome, VerifyOptions};

const USAGE: &str = "\
usage: carrel-audit COMMAND DIR [OPTIONS]

commands:
  verify DIR [--checkpoint FILE]... [--key HEX|FILE] [--all]
        check every record, the tree, the signatures, the blobs, and consistency with
        checkpoints you kept; prints what was checked and OK, or the failures (the first
        50; --all for every one) and exits 1
  show DIR [--from N] [--count N] [--json]
        summary of the log and its events (default: the first 50)
  prove DIR --index N [--size M] [--old-size M]
        inclusion proof of record N in the tree of size M (default: the latest checkpoint
        that covers N, else the whole log); with --old-size, also a consistency proof
  checkpoint DIR [--key FILE] [--latest]
        sign and store a checkpoint of the log now (needs the host key and no running
        writer); --latest prints the newest stored checkpoint instead
  replay DIR -o FILE
        write a self-contained HTML page that steps through the session
  export DIR --jsonl [-o FILE]
        one JSON object per record with its leaf hash
";

/// Command-line arguments after the command and directory.
struct Arguments {
    flags: Vec<String>,
    values: Vec<(String, String)>,
}

impl Arguments {
    fn parse(args: &[String], value_options: &[&str], flag_options: &[&str]) -> anyhow::Result<Arguments> {
        let mut parsed = Arguments { flags: Vec::new(), values: Vec::new() };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if value_options.contains(&arg.as_str()) {
                let value = iter.next().ok_or_else(|| anyhow!("{arg} needs a value"))?;
                parsed.values.push((arg.clone(), value.clone()));
            } else if flag_options.contains(&arg.as_str()) {
                parsed.flags.push(arg.clone());
            } else {
                bail!("unknown argument '{arg}' (see carrel-audit --help)");
            }
        }
        Ok(parsed)
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|flag| flag == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.values.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.values.iter().filter(|(key, _)| key == name).map(|(_, value)| value.as_str()).collect()
    }

    fn number(&self, name: &str) -> anyhow::Result<Option<u64>> {
        self.value(name)
            .map(|text| text.parse().with_context(|| format!("{name} takes a number, not '{text}'")))
            .transpose()
    }
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`carrel-audit export ... | head`), as command-line tools
    // do, instead of reporting it as an error.
    // SAFETY: restores the default disposition of SIGPIPE before any thread is started; no
    // handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return if args.is_empty() { ExitCode::from(2) } else { ExitCode::SUCCESS };
    }
    match run(&args) {
        Ok(code) => code,
        Err(error) => {
            let chain: Vec<String> = error.chain().map(|cause| cause.to_string()).collect();
            eprintln!("carrel-audit: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let command = args[0].as_str();
    let dir = PathBuf::from(
        args.get(1)
            .filter(|arg| !arg.starts_with('-'))
            .ok_or_else(|| anyhow!("{command} needs the log directory (see carrel-audit --help)"))?,
    );
    let rest = &args[2..];
    match command {
        "verify" => verify(&dir, &Arguments::parse(rest, &["--checkpoint", "--key"], &[])?),
        "show" => show(&dir, &Arguments::parse(rest, &["--from", "--count"], &["--json"])?),
        "prove" => prove(&dir, &Arguments::parse(rest, &["--index", "--size", "--old-size"], &[])?),
        "checkpoint" => checkpoint(&dir, &Arguments::parse(rest, &["--key"], &["--latest"])?),
        "replay" => replay(&dir, &Arguments::parse(rest, &["-o", "--output"], &[])?),
        "export" => export(&dir, &Arguments::parse(rest, &["-o", "--output"], &["--jsonl"])?),
        other => bail!("unknown command '{other}' (see carrel-audit --help)"),
    }
}

fn verify(dir: &Path, args: &Arguments) -> anyhow::Result<ExitCode> {
    let key = match args.value("--key") {
        None => None,
        Some(text) if Path::new(text).is_file() => Some(read_public_key(Path::new(text))?),
        Some(text) => Some(parse_public_key(text, "--key")?),
    };
    let options = VerifyOptions { key, checkpoints: args.all("--checkpoint").into_iter().map(PathBuf::from).collect() };
    let report = verify_dir(dir, &options)?;
    let limit = if args.flag("--all") { None } else { Some(50) };
    for line in report.lines(limit) {
        println!("{line}");
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn origin(dir: &Path) -> anyhow::Result<String> {
    let path = Layout::new(dir).origin();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} an audit log?)", path.display(), dir.display()))?;
    Ok(text.trim_end_matches('\n').to_string())
}

fn show(dir: &Path, args: &Arguments) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(dir);
    let origin = origin(dir)?;
    let from = args.number("--from")?.unwrap_or(0);
    let count = args.number("--count")?.unwrap_or(50);
    let records = for_each_record(&layout.log(), u64::MAX, |_| Ok(ControlFlow::Continue(())))?;
    let latest = latest_checkpoint(&layout.checkpoints())?;
    let mut events = Vec::new();
    if count > 0 {
        for_each_event(&layout.log(), from, |event, leaf| {
            events.push((event.clone(), *leaf));
            if events.len() as u64 >= count {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
    }
    let stored = TreeStore::open_read_only(&layout.tree())?;
    let stored_size = stored.size().min(records.records);
    let stored_root = tree::root(&stored, stored_size)?;
    if args.flag("--json") {
        let document = serde_json::json!({
            "dir": dir.display().to_string(),
            "origin": origin,
            "records": records.records,
            "torn_tail": records.torn_tail,
            "stored_tree": {"size": stored_size, "root": to_hex(&stored_root)},
            "latest_checkpoint": latest.as_ref().map(|c| serde_json::json!({
                "size": c.checkpoint.tree_size,
                "root": to_hex(&c.checkpoint.root),
                "time": format_time(c.checkpoint.time_unix_nanos),
                "key": to_hex(&c.key),
            })),
            "events": events.iter().map(|(event, leaf)| event_json(event, leaf)).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("log {} (origin '{origin}')", dir.display());
    println!("records: {}", records.records);
    if let Some(torn) = &records.torn_tail {
        println!("torn tail (not a record): {torn}");
    }
    println!("stored tree: size {stored_size} root {} (not verified; run verify)", to_hex(&stored_root));
    match &latest {
        Some(c) => println!(
            "latest checkpoint: size {} root {} at {}",
            c.checkpoint.tree_size,
            to_hex(&c.checkpoint.root),
            format_time(c.checkpoint.time_unix_nanos)
        ),
        None => println!("latest checkpoint: none"),
    }
    for (event, _) in &events {
        let params: Vec<String> = event.params.iter().map(|p| format!("{}={}", p.key, p.value)).collect();
        let result = match &event.outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Error(message) => format!("error: {message}"),
        };
        let actor = event.actor.map(|a| format!(" pid={} uid={} gid={}", a.pid, a.uid, a.gid)).unwrap_or_default();
        let shots: String = event
            .screenshots()
            .map(|(field, hash)| format!(" {}={}", field.trim_start_matches("screenshot_"), &to_hex(&hash)[..12]))
            .collect();
        println!(
            "#{} {} {} {} -> {}{actor}{shots}",
            event.seq,
            format_time(event.time_unix_nanos),
            event.action,
            params.join(" "),
            result
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn prove(dir: &Path, args: &Arguments) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(dir);
    let index = args.number("--index")?.ok_or_else(|| anyhow!("prove needs --index N"))?;
    let stored = TreeStore::open_read_only(&layout.tree())?;
    let mut record_leaf = None;
    let records = for_each_record(&layout.log(), index, |record| {
        record_leaf = Some(record.leaf);
        Ok(ControlFlow::Break(()))
    })?;
    let leaf = record_leaf.ok_or_else(|| anyhow!("the log has no record {index} ({} records)", records.records))?;
    let latest = latest_checkpoint(&layout.checkpoints())?;
    let available = stored.size();
    let size = match args.number("--size")? {
        Some(size) => size,
        None => match &latest {
            Some(c) if c.checkpoint.tree_size > index && c.checkpoint.tree_size <= available => c.checkpoint.tree_size,
            _ => available,
        },
    };
    if size > available {
        bail!("the stored tree has {available} leaves, fewer than size {size}; open the log with the writer to rebuild it");
    }
    if stored.node(0, index) != Some(leaf) {
        bail!("record {index} does not match the stored tree's leaf; run carrel-audit verify");
    }
    let root = tree::root(&stored, size)?;
    let path = tree::inclusion_proof(&stored, index, size)?;
    tree::verify_inclusion(&leaf, index, size, &path, &root)
        .context("the stored tree gives a proof that does not verify; run carrel-audit verify")?;
    let checkpoint = latest.as_ref().filter(|c| c.checkpoint.tree_size == size).map(|c| c.checkpoint.root == root);
    let mut document = serde_json::json!({
        "leaf_index": index,
        "tree_size": size,
        "leaf_hash": to_hex(&leaf),
        "root": to_hex(&root),
        "inclusion_path": path.iter().map(|h| to_hex(h)).collect::<Vec<_>>(),
        "root_matches_latest_checkpoint": checkpoint,
    });
    if let Some(old_size) = args.number("--old-size")? {
        let proof = tree::consistency_proof(&stored, old_size, size)?;
        let old_root = tree::root(&stored, old_size)?;
        tree::verify_consistency(old_size, size, &old_root, &root, &proof)
            .context("the stored tree gives a consistency proof that does not verify; run carrel-audit verify")?;
        document["consistency"] = serde_json::json!({
            "old_size": old_size,
            "old_root": to_hex(&old_root),
            "new_size": size,
            "path": proof.iter().map(|h| to_hex(h)).collect::<Vec<_>>(),
        });
    }
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(ExitCode::SUCCESS)
}

fn checkpoint(dir: &Path, args: &Arguments) -> anyhow::Result<ExitCode> {
    if args.flag("--latest") {
        let latest = latest_checkpoint(&Layout::new(dir).checkpoints())?
            .ok_or_else(|| anyhow!("{} has no checkpoints", dir.display()))?;
        print!("{}", latest.to_text());
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = AuditConfig::new(origin(dir)?);
    config.key_path = args.value("--key").map(PathBuf::from);
    let log = AuditLog::open_with(dir, config).map_err(|e| anyhow!(error_chain(&e)))?;
    if log.recovery().repaired() {
        eprintln!("carrel-audit: recovered the log: {:?}", log.recovery());
    }
    let signed = log.checkpoint().map_err(|e| anyhow!(error_chain(&e)))?;
    print!("{}", signed.to_text());
    Ok(ExitCode::SUCCESS)
}

fn output_path(args: &Arguments) -> Option<PathBuf> {
    args.value("-o").or_else(|| args.value("--output")).map(PathBuf::from)
}

fn replay(dir: &Path, args: &Arguments) -> anyhow::Result<ExitCode> {
    let output = output_path(args).ok_or_else(|| anyhow!("replay needs -o FILE"))?;
    let file = std::fs::File::create(&output).with_context(|| format!("cannot create {}", output.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    let summary = write_replay(dir, &mut writer)?;
    eprintln!(
        "wrote {}: {} events, {} screenshots{}",
        output.display(),
        summary.events,
        summary.screenshots,
        if summary.bad_screenshots > 0 {
            format!(", {} missing or altered (run carrel-audit verify)", summary.bad_screenshots)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn export(dir: &Path, args: &Arguments) -> anyhow::Result<ExitCode> {
    if !args.flag("--jsonl") {
        bail!("export needs a format: --jsonl");
    }
    let summary = match output_path(args) {
        Some(path) => {
            let file = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            export_jsonl(dir, &mut std::io::BufWriter::new(file))?
        }
        None => {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            let summary = export_jsonl(dir, &mut lock)?;
            lock.flush()?;
            summary
        }
    };
    if let Some(torn) = summary.torn_tail {
        eprintln!("carrel-audit: stopped at a torn tail (not a record): {torn}");
    }
    Ok(ExitCode::SUCCESS)
}
