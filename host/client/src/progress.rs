//! Upload bodies: large ones are streamed in chunks so progress can be printed on stderr
//! (`uploaded N/M bytes (P%)`, one line per 10%).
//!
//! Progress is shown for bodies over [`PROGRESS_THRESHOLD`] when stderr is a terminal or the
//! command was given `--progress`; everything else is sent as one plain body.

use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bodies up to this size upload too fast for progress to be worth printing.
pub const PROGRESS_THRESHOLD: usize = 1024 * 1024;
/// Size of the pieces a large body is streamed in.
const CHUNK: usize = 64 * 1024;

/// Counts bytes handed to the connection and says when another tenth is done.
#[derive(Debug)]
pub struct Progress {
    total: u64,
    sent: u64,
    next_tenth: u64,
}

impl Progress {
    pub fn new(total: u64) -> Progress {
        Progress {
            total,
            sent: 0,
            next_tenth: 1,
        }
    }

    /// Records `bytes` more sent; returns a line to print when a new tenth was reached
    /// (one line even if a chunk crossed several tenths).
    pub fn advance(&mut self, bytes: u64) -> Option<String> {
        self.sent = (self.sent + bytes).min(self.total);
        if self.total == 0 || self.sent * 10 < self.next_tenth * self.total {
            return None;
        }
        self.next_tenth = self.sent * 10 / self.total + 1;
        let percent = self.sent * 100 / self.total;
        Some(format!(
            "uploaded {}/{} bytes ({percent}%)",
            self.sent, self.total
        ))
    }
}

/// Whether to show progress for a body of `length` bytes.
pub fn wants_progress(length: usize, forced: bool) -> bool {
    length > PROGRESS_THRESHOLD && (forced || std::io::stderr().is_terminal())
}

/// The request body for `body`: streamed with progress lines when [`wants_progress`] says so.
pub fn upload_body(body: Bytes, forced: bool) -> reqwest::Body {
    if !wants_progress(body.len(), forced) {
        return reqwest::Body::from(body);
    }
    let mut progress = Progress::new(body.len() as u64);
    let chunks = chunks(body).map(move |chunk| {
        if let Some(line) = progress.advance(chunk.len() as u64) {
            eprintln!("{line}");
        }
        Ok::<Bytes, std::io::Error>(chunk)
    });
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

/// How often [`with_wait_notes`] says the client is still waiting.
const WAIT_NOTE_EVERY: Duration = Duration::from_secs(3);

/// Awaits `work`, printing `{what}: N s` on stderr every few seconds until it ends: a large
/// plugin's push waits while the server compiles it (an 18 MB Python component takes about
/// 15 s), and silence that long looks like a hang.
pub async fn with_wait_notes<T>(work: impl Future<Output = T>, what: &str) -> T {
    noting_every(work, WAIT_NOTE_EVERY, &mut |seconds| {
        eprintln!("{what}: {seconds} s");
    })
    .await
}

/// Awaits `work`, calling `note` with the whole seconds waited every `every` until it ends.
async fn noting_every<T>(
    work: impl Future<Output = T>,
    every: Duration,
    note: &mut (dyn FnMut(u64) + Send),
) -> T {
    let started = Instant::now();
    let mut notes = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = notes.tick() => note(started.elapsed().as_secs()),
        }
    }
}

/// `body` cut into [`CHUNK`]-sized pieces (cheap: they share the buffer).
fn chunks(body: Bytes) -> impl Iterator<Item = Bytes> + Send + 'static {
    let length = body.len();
    (0..length)
        .step_by(CHUNK)
        .map(move |start| body.slice(start..(start + CHUNK).min(length)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn prints_one_line_per_tenth() {
        let total = 10 * 1024 * 1024;
        let mut progress = Progress::new(total);
        let lines: Vec<String> = (0..total / CHUNK as u64)
            .filter_map(|_| progress.advance(CHUNK as u64))
            .collect();
        assert_eq!(lines.len(), 10, "{lines:?}");
        assert_eq!(lines[0], "uploaded 1048576/10485760 bytes (10%)");
        assert_eq!(lines[9], "uploaded 10485760/10485760 bytes (100%)");
    }

    #[test]
    fn a_big_chunk_gives_one_line() {
        let mut progress = Progress::new(100);
        assert_eq!(progress.advance(5), None);
        assert_eq!(
            progress.advance(40).as_deref(),
            Some("uploaded 45/100 bytes (45%)")
        );
        assert_eq!(progress.advance(4), None);
        assert_eq!(
            progress.advance(1).as_deref(),
            Some("uploaded 50/100 bytes (50%)")
        );
        assert_eq!(
            progress.advance(500).as_deref(),
            Some("uploaded 100/100 bytes (100%)")
        );
        assert_eq!(progress.advance(1), None);
    }

    #[test]
    fn chunks_cover_the_body_exactly() {
        let body = Bytes::from((0..(3 * CHUNK + 7)).map(|i| i as u8).collect::<Vec<u8>>());
        let pieces: Vec<Bytes> = chunks(body.clone()).collect();
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces[3].len(), 7);
        assert_eq!(pieces.concat(), body.to_vec());
        assert_eq!(chunks(Bytes::new()).count(), 0);
    }

    #[tokio::test]
    async fn waiting_notes_come_until_the_work_ends() {
        let mut notes = Vec::new();
        let answer = noting_every(
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                42
            },
            Duration::from_millis(10),
            &mut |seconds| notes.push(seconds),
        )
        .await;
        assert_eq!(answer, 42);
        assert!(notes.len() >= 3, "{notes:?}");
        assert!(notes.iter().all(|&s| s == 0), "{notes:?}");
        // Work that ends at once returns at once, without a note.
        let mut none = Vec::new();
        let mut note = |s| none.push(s);
        let quick = noting_every(async { 7 }, Duration::from_millis(10), &mut note).await;
        assert_eq!(quick, 7);
        assert!(none.is_empty());
    }

    #[test]
    fn small_bodies_never_show_progress() {
        assert!(!wants_progress(PROGRESS_THRESHOLD, true));
        assert!(wants_progress(PROGRESS_THRESHOLD + 1, true));
    }
}
