//! The session replay: one self-contained HTML page that steps through a log's events
//! with the screenshots before and after each, for a person to look at.
//!
//! Screenshots are embedded once each as `data:` URIs (only after their content was checked
//! against their blake3 name; an altered or missing blob is shown as such, never as an
//! image). Events travel as JSON inside a `<script type="application/json">` block with
//! every `<` escaped, and the page renders text with `textContent` only, so nothing an
//! agent typed can become markup.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;

use serde_json::{json, Value};
use thiserror::Error;

use crate::blob::{BlobError, BlobStore};
use crate::codec::{to_base64, to_hex};
use crate::export::event_json;
use crate::layout::Layout;
use crate::reader::{for_each_event, ReadError};

/// Errors of writing a replay.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot read the log")]
    ReadLog(#[source] ReadError),
    #[error("cannot encode the session")]
    EncodeSession(#[source] serde_json::Error),
    #[error("cannot write the replay page")]
    WritePage(#[source] std::io::Error),
}

/// What a replay page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    pub events: u64,
    pub screenshots: u64,
    /// Screenshots that were missing or did not match their name.
    pub bad_screenshots: u64,
}

/// The MIME type of an image a browser shows, from its first bytes.
fn image_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.starts_with(b"BM") {
        Some("image/bmp")
    } else {
        None
    }
}

fn blob_json(store: &BlobStore, hash: &[u8; 32]) -> (Value, bool) {
    match store.get(hash) {
        Ok(bytes) => match image_type(&bytes) {
            Some(mime) => {
                (json!({"uri": format!("data:{mime};base64,{}", to_base64(&bytes)), "bytes": bytes.len()}), true)
            }
            None => (json!({"note": format!("not an image a browser shows ({} bytes)", bytes.len())}), true),
        },
        Err(BlobError::CheckContent { .. }) => {
            (json!({"note": "ALTERED: the stored file does not match this screenshot's hash"}), false)
        }
        Err(_) => (json!({"note": "MISSING from the blob store"}), false),
    }
}

/// Writes the replay page of the log in `dir` to `out`.
pub fn write_replay(dir: &Path, out: &mut dyn Write) -> Result<ReplaySummary, ReplayError> {
    let layout = Layout::new(dir);
    let store = BlobStore::at(&layout.blobs());
    let mut events = Vec::new();
    let mut blobs: BTreeMap<String, Value> = BTreeMap::new();
    let mut bad_screenshots = 0u64;
    let summary = for_each_event(&layout.log(), 0, |event, leaf| {
        for (_, hash) in event.screenshots() {
            let hex = to_hex(&hash);
            if let std::collections::btree_map::Entry::Vacant(entry) = blobs.entry(hex) {
                let (value, good) = blob_json(&store, &hash);
                bad_screenshots += u64::from(!good);
                entry.insert(value);
            }
        }
        events.push(event_json(event, leaf));
        ControlFlow::Continue(())
    })
    .map_err(ReplayError::ReadLog)?;
    let origin = std::fs::read_to_string(layout.origin()).unwrap_or_default();
    let session = json!({
        "vm": origin.trim_end(),
        "dir": dir.display().to_string(),
        "torn_tail": summary.torn_tail,
        "events": events,
        "blobs": blobs,
    });
    let data = serde_json::to_string(&session).map_err(ReplayError::EncodeSession)?.replace('<', "\\u003c");
    let page = PAGE.replace("/*SESSION*/", &data);
    out.write_all(page.as_bytes()).map_err(ReplayError::WritePage)?;
    out.flush().map_err(ReplayError::WritePage)?;
    Ok(ReplaySummary { events: summary.records, screenshots: blobs.len() as u64, bad_screenshots })
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Carrel session replay</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #f4f4f6; }
  header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: 8px 16px; z-index: 1; }
  h1 { font-size: 16px; margin: 0 0 6px; }
  .controls { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
  .controls input[type=range] { flex: 1; min-width: 200px; }
  button { font: inherit; padding: 2px 10px; }
  main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(260px, 1fr); gap: 12px; padding: 12px 16px; }
  .shots { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 8px; align-items: start; }
  figure { margin: 0; background: #fff; border: 1px solid #ccc; padding: 6px; min-width: 0; }
  .hash { font: 11px ui-monospace, monospace; word-break: break-all; color: #555; margin-top: 4px; }
  figcaption { font-weight: 600; margin-bottom: 4px; }
  figure img { max-width: 100%; display: block; image-rendering: auto; }
  .none { color: #777; font-style: italic; padding: 40px 0; text-align: center; }
  .bad { color: #b00020; font-weight: 600; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  td { border: 1px solid #ddd; padding: 3px 6px; vertical-align: top; word-break: break-all; }
  td:first-child { font-weight: 600; white-space: nowrap; word-break: normal; }
  .error { color: #b00020; }
  ol { margin: 0; padding: 0 16px 16px 48px; font-family: ui-monospace, monospace; font-size: 12px; }
  li { cursor: pointer; padding: 1px 4px; }
  li.current { background: #ffe79a; }
  li.failed { color: #b00020; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div class="controls">
    <button id="first" title="first event (Home)">First</button>
    <button id="prev" title="previous event (Left)">Previous</button>
    <button id="play" title="play/pause (Space)">Play</button>
    <button id="next" title="next event (Right)">Next</button>
    <button id="last" title="last event (End)">Last</button>
    <input id="slider" type="range" min="0" value="0">
    <span id="position"></span>
  </div>
</header>
<main>
  <section class="shots">
    <figure><figcaption>Screen before</figcaption><div id="before"></div></figure>
    <figure><figcaption>Screen after</figcaption><div id="after"></div></figure>
  </section>
  <section><table id="details"></table></section>
</main>
<ol id="timeline" start="0"></ol>
<script type="application/json" id="session">/*SESSION*/</script>
<script>
"use strict";
const session = JSON.parse(document.getElementById("session").textContent);
const events = session.events;
let current = 0;
let timer = null;
const el = (id) => document.getElementById(id);
el("title").textContent = "Carrel session replay: VM " + session.vm + ", " + events.length +
  " events" + (session.torn_tail ? " (torn tail not shown: " + session.torn_tail + ")" : "");
el("slider").max = Math.max(events.length - 1, 0);

function shot(target, hash) {
  const box = el(target);
  box.replaceChildren();
  if (!hash) {
    const none = document.createElement("div");
    none.className = "none";
    none.textContent = "no screenshot";
    box.append(none);
    return;
  }
  const blob = session.blobs[hash] || { note: "unknown" };
  if (blob.uri) {
    const img = document.createElement("img");
    img.src = blob.uri;
    img.alt = "screenshot " + hash;
    box.append(img);
  } else {
    const note = document.createElement("div");
    note.className = "none bad";
    note.textContent = blob.note;
    box.append(note);
  }
  const name = document.createElement("div");
  name.className = "hash";
  name.textContent = "blake3 " + hash;
  box.append(name);
}

function row(table, key, value, cls) {
  const tr = document.createElement("tr");
  const k = document.createElement("td");
  const v = document.createElement("td");
  k.textContent = key;
  v.textContent = value;
  if (cls) v.className = cls;
  tr.append(k, v);
  table.append(tr);
}

function summary(e) {
  const params = e.params.map((p) => p.key + "=" + p.value).join(" ");
  return e.time.slice(11, 23) + "  " + e.action + (params ? "  " + params : "") +
    (e.result === "ok" ? "" : "  ERROR");
}

function show(index) {
  if (events.length === 0) { el("position").textContent = "no events"; return; }
  current = Math.min(Math.max(index, 0), events.length - 1);
  const e = events[current];
  el("slider").value = current;
  el("position").textContent = "event " + current + " of " + (events.length - 1);
  shot("before", e.screenshot_before);
  shot("after", e.screenshot_after);
  const table = el("details");
  table.replaceChildren();
  row(table, "seq", String(e.seq));
  row(table, "time", e.time);
  row(table, "action", e.action);
  for (const p of e.params) row(table, "param " + p.key, p.value);
  row(table, "result", e.result === "ok" ? "ok" : "error: " + e.error, e.result === "ok" ? "" : "error");
  row(table, "actor", e.actor ? "pid " + e.actor.pid + " uid " + e.actor.uid + " gid " + e.actor.gid : "-");
  row(table, "vm", e.vm);
  row(table, "leaf hash", e.leaf_hash);
  for (const li of document.querySelectorAll("li.current")) li.classList.remove("current");
  const item = el("timeline").children[current];
  if (item) { item.classList.add("current"); item.scrollIntoView({ block: "nearest" }); }
}

const timeline = el("timeline");
events.forEach((e, i) => {
  const li = document.createElement("li");
  li.textContent = summary(e);
  if (e.result !== "ok") li.className = "failed";
  li.addEventListener("click", () => show(i));
  timeline.append(li);
});

function play() {
  if (timer) { clearInterval(timer); timer = null; el("play").textContent = "Play"; return; }
  el("play").textContent = "Pause";
  timer = setInterval(() => {
    if (current >= events.length - 1) { play(); return; }
    show(current + 1);
  }, 1000);
}

el("first").onclick = () => show(0);
el("prev").onclick = () => show(current - 1);
el("next").onclick = () => show(current + 1);
el("last").onclick = () => show(events.length - 1);
el("play").onclick = play;
el("slider").oninput = (ev) => show(Number(ev.target.value));
document.addEventListener("keydown", (ev) => {
  if (ev.key === "ArrowRight") show(current + 1);
  else if (ev.key === "ArrowLeft") show(current - 1);
  else if (ev.key === "Home") show(0);
  else if (ev.key === "End") show(events.length - 1);
  else if (ev.key === " ") { ev.preventDefault(); play(); }
});
// `page.html#12` opens event 12, so a person can link to an event.
show(Number(location.hash.slice(1)) || 0);
window.addEventListener("hashchange", () => show(Number(location.hash.slice(1)) || 0));
</script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_type_of_known_magics_is_found() {
        assert_eq!(image_type(b"\x89PNG\r\n\x1a\nrest"), Some("image/png"));
        assert_eq!(image_type(&[0xff, 0xd8, 0xff, 0xe0]), Some("image/jpeg"));
        assert_eq!(image_type(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(image_type(b"P6\n640 480\n255\n"), None);
    }
}
