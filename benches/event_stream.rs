//! Marathon's event stream parsed: weft's reader (each chunk handed to the parser a line at a
//! time, `weft::sources::marathon::events`) beside the parser on whole chunks, as weft read the
//! stream before. The parser copies the text it holds after each line it reads: on whole
//! chunks the cost grows with the lines a chunk holds times its length.
//!
//! ```text
//! cargo bench --bench event_stream
//! ```
//!
//! 1 MiB of stream in chunks of 16 KiB and 256 KiB (hyper hands over up to a few hundred KiB
//! at once from a busy stream), of two kinds: Marathon `status_update_event`s (about 600 bytes
//! each, as a rolling deploy of many apps sends them) and the shortest events there are. For
//! each, the time to read every event, median of 5, on this thread. BENCHMARKS.md records the
//! results.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;

const STREAM: usize = 1 << 20;
const RUNS: usize = 5;

fn status_update(i: usize) -> String {
    format!(
        "event: status_update_event\ndata: {{\"slaveId\":\"agent-{a}\",\"taskId\":\"shop_{i}.{i:08x}\",\
         \"taskStatus\":\"TASK_RUNNING\",\"message\":\"\",\"appId\":\"/team-{t}/shop-{i}\",\
         \"host\":\"10.0.{a}.{b}\",\"ipAddresses\":[{{\"ipAddress\":\"10.2.{a}.{b}\",\"protocol\":\"IPv4\"}}],\
         \"ports\":[31{b:03}],\"version\":\"2026-12-03T22:00:00.000Z\",\"eventType\":\"status_update_event\",\
         \"timestamp\":\"2026-12-03T22:00:01.000Z\"}}\n\n",
        a = i % 250,
        b = i % 200,
        t = i % 40,
    )
}

/// `STREAM` bytes of events, in chunks of `chunk` bytes.
fn stream(event: impl Fn(usize) -> String, chunk: usize) -> (Vec<Bytes>, usize) {
    let mut text = String::new();
    let mut events = 0;
    while text.len() < STREAM {
        text.push_str(&event(events));
        events += 1;
    }
    let chunks = text
        .as_bytes()
        .chunks(chunk)
        .map(Bytes::copy_from_slice)
        .collect();
    (chunks, events)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn timed(runs: usize, read: impl Fn() -> usize, events: usize) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                assert_eq!(read(), events);
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    type Chunk = Result<Bytes, std::convert::Infallible>;
    type Kind = (&'static str, Box<dyn Fn(usize) -> String>);
    let kinds: [Kind; 2] = [
        ("status_update_event (~600 B)", Box::new(status_update)),
        (
            "shortest events (18 B)",
            Box::new(|_| "event: x\ndata: 1\n\n".to_string()),
        ),
    ];
    println!("1 MiB of event stream, median of {RUNS}: weft (a line at a time) / the parser on whole chunks");
    for (kind, event) in &kinds {
        for chunk in [16 << 10, 256 << 10] {
            let (chunks, events) = stream(event, chunk);
            let feed = || futures::stream::iter(chunks.clone().into_iter().map(Chunk::Ok));
            let count = |stream: futures::stream::BoxStream<'_, bool>| {
                futures::executor::block_on(stream.filter(|ok| futures::future::ready(*ok)).count())
            };
            let weft = timed(
                RUNS,
                || {
                    count(
                        weft::sources::marathon::events(feed())
                            .map(|e| e.is_ok())
                            .boxed(),
                    )
                },
                events,
            );
            // On whole chunks, at 256 KiB, the shortest events take seconds a run: fewer runs.
            let runs = if chunk > 64 << 10 { 1 } else { RUNS };
            let whole = timed(
                runs,
                || count(feed().eventsource().map(|e| e.is_ok()).boxed()),
                events,
            );
            println!(
                "  {kind}, {events} events in chunks of {} KiB: weft {:.1} ms, whole chunks {:.1} ms{}",
                chunk >> 10,
                weft.as_secs_f64() * 1e3,
                whole.as_secs_f64() * 1e3,
                if runs == 1 { " (one run)" } else { "" },
            );
        }
    }
}
