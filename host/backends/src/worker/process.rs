//! The model worker process itself (`weft worker`, started only by the server).
//!
//! Start-up order matters: receive the shared arena over the control socket (fd 0), load the
//! ONNX Runtime library, map the arena, then close the sandbox ([`super::sandbox`]) while the
//! process still has a single thread, and only then say `Ready` and read models. A pool of
//! threads (two, plus one per loaded session) takes turns reading the socket: the thread that
//! reads a call runs it on a free session of its model and writes the answer, so a call costs
//! no hand-off between threads; while it computes, another thread reads the next frame.
//!
//! The worker exits when the server closes the socket; a frame it cannot parse ends it too
//! (the server treats that as a crash and restarts it).

use std::collections::HashMap;
use std::io::BufReader;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use ort::session::Session;
use weft_core::{Error, NamedTensor, Result, Tensor};

use super::sandbox::{self, SandboxPolicy};
use super::shm::SharedArena;
use super::wire::{
    FromWorker, MAX_FRAME_TO_WORKER, Placement, ToWorker, WireError, WireMetadata, WireTensor,
    decode, place, read_frame, write_frame,
};
use crate::onnx::{OnnxOptions, SessionSource, build_sessions, init_onnxruntime, run_session};

/// What the server tells a worker on its command line.
#[derive(Clone, Debug)]
pub struct WorkerArgs {
    pub ort_library: PathBuf,
    pub slots: usize,
    pub slot_bytes: usize,
    pub policy: SandboxPolicy,
}

type Writer = Arc<Mutex<UnixStream>>;

/// One loaded model: its sessions, each used by one call at a time.
struct Sessions {
    sessions: Vec<Mutex<Session>>,
}

/// What every thread of the worker shares.
struct Worker {
    /// Held by the one thread reading the next frame (leader/follower): the thread that reads a
    /// call runs it, so a call costs no hand-off between threads.
    reader: Mutex<BufReader<SpinningReader>>,
    writer: Writer,
    models: RwLock<HashMap<u64, Arc<Sessions>>>,
    arena: Arc<SharedArena>,
}

/// How long the reading thread polls the socket before it sleeps in `read`, when the last
/// frame came within that time: back-to-back calls are then seen without a wake-up (tens of
/// microseconds on a VM), while calls spaced further apart (an HTTP client at concurrency 1,
/// an idle worker) never pay for a spin that would only take a core from the server.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// The control socket, read with a short adaptive spin before blocking.
struct SpinningReader {
    socket: UnixStream,
    /// Whether the last frame arrived within [`SPIN`] of the read that waited for it.
    spin: bool,
}

impl std::io::Read for SpinningReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use rustix::net::{RecvFlags, recv};
        let started = std::time::Instant::now();
        if self.spin {
            while started.elapsed() < SPIN {
                match recv(&self.socket, &mut *buf, RecvFlags::DONTWAIT) {
                    Ok((_, received)) => return Ok(received),
                    Err(rustix::io::Errno::AGAIN) => std::hint::spin_loop(),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        let received = std::io::Read::read(&mut self.socket, buf)?;
        self.spin = started.elapsed() < SPIN;
        Ok(received)
    }
}

/// Threads beyond the sessions, so a frame is read while every session computes.
const SPARE_THREADS: usize = 2;

/// Runs the worker until the server closes the control socket.
pub fn run(args: WorkerArgs) -> Result<()> {
    // A server that dies without closing the socket (SIGKILL) takes its workers with it.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let socket = control_socket()?;
    let arena_fd = receive_fd(&socket)?;
    init_onnxruntime(&args.ort_library, 0)?;
    let arena = Arc::new(SharedArena::open(arena_fd, args.slots, args.slot_bytes)?);
    let writer: Writer = Arc::new(Mutex::new(socket.try_clone().map_err(io("clone"))?));
    let sandbox = sandbox::apply(&args.policy)?;
    send(&writer, &FromWorker::Ready { sandbox })?;
    let worker = Arc::new(Worker {
        reader: Mutex::new(BufReader::with_capacity(
            64 << 10,
            SpinningReader { socket, spin: true },
        )),
        writer,
        models: RwLock::default(),
        arena,
    });
    for _ in 0..SPARE_THREADS {
        spawn_thread(&worker)?;
    }
    serve(&worker)
}

fn spawn_thread(worker: &Arc<Worker>) -> Result<()> {
    let worker = Arc::clone(worker);
    std::thread::Builder::new()
        .name("weft-worker".into())
        .spawn(move || {
            if let Err(error) = serve(&worker) {
                eprintln!("weft worker: {error}");
                std::process::exit(1);
            }
        })
        .map(drop)
        .map_err(|error| Error::unavailable(format!("cannot start a worker thread: {error}")))
}

/// One thread's loop: take the reader, read a frame, let the next thread read, handle it.
/// The end of the socket (the server is gone) ends the whole process.
fn serve(worker: &Arc<Worker>) -> Result<()> {
    loop {
        let frame = {
            let mut reader = worker
                .reader
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            read_frame(&mut *reader, MAX_FRAME_TO_WORKER).map_err(io("read"))?
        };
        let Some(body) = frame else {
            std::process::exit(0);
        };
        match decode::<ToWorker>(&body)? {
            ToWorker::Load {
                call,
                handle,
                onnx,
                options,
            } => {
                drop(body);
                let result = load(handle, &onnx, &options, worker);
                drop(onnx);
                send(
                    &worker.writer,
                    &FromWorker::Loaded {
                        call,
                        result: result.map_err(|error| WireError::from(&error)),
                    },
                )?;
            }
            ToWorker::Unload { handle } => {
                write_lock(&worker.models).remove(&handle);
            }
            ToWorker::Infer {
                call,
                handle,
                slot,
                inputs,
            } => {
                let sessions = read_lock(&worker.models).get(&handle).cloned();
                let result = match sessions {
                    Some(sessions) => infer(&sessions, &worker.arena, slot, inputs),
                    None => Err(Error::unavailable("the model is not loaded in its worker")),
                };
                send(
                    &worker.writer,
                    &FromWorker::Inferred {
                        call,
                        result: result.map_err(|error| WireError::from(&error)),
                    },
                )?;
            }
        }
    }
}

/// Runs one call on a free session of the model (the server admits at most one call per
/// session, so one is free but for a moment's race) and releases it before answering.
fn infer(
    sessions: &Sessions,
    arena: &Arc<SharedArena>,
    slot: u32,
    inputs: Vec<WireTensor>,
) -> Result<Vec<WireTensor>> {
    let free = sessions
        .sessions
        .iter()
        .find_map(|session| session.try_lock().ok());
    let mut session = match free {
        Some(session) => session,
        None => sessions
            .sessions
            .first()
            .ok_or_else(|| Error::internal("a model without sessions"))?
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    };
    catch_unwind(AssertUnwindSafe(|| {
        run_job(&mut session, arena, slot, inputs)
    }))
    .unwrap_or_else(|_| Err(Error::internal("ONNX Runtime panicked during inference")))
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |error| Error::unavailable(format!("model worker control socket ({what}): {error}"))
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn send(writer: &Writer, message: &FromWorker) -> Result<()> {
    let mut stream = writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    write_frame(&mut *stream, message)
}

/// The control socket the server passed as standard input.
fn control_socket() -> Result<UnixStream> {
    let fd: OwnedFd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io("stdin"))?;
    Ok(UnixStream::from(fd))
}

/// Receives the arena's memfd, the first thing the server sends (SCM_RIGHTS).
fn receive_fd(socket: &UnixStream) -> Result<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    recvmsg(
        socket,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|error| Error::unavailable(format!("cannot receive the worker arena: {error}")))?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(fd);
        }
    }
    Err(Error::unavailable("the server sent no worker arena"))
}

fn load(
    handle: u64,
    onnx: &[u8],
    options: &OnnxOptions,
    worker: &Arc<Worker>,
) -> Result<WireMetadata> {
    let (sessions, metadata) = catch_unwind(AssertUnwindSafe(|| {
        build_sessions(SessionSource::Bytes(onnx), options)
    }))
    .map_err(|_| Error::internal("ONNX Runtime panicked while loading the model"))??;
    // One more thread per session, so every session can compute while a frame is read.
    for _ in 0..sessions.len() {
        spawn_thread(worker)?;
    }
    write_lock(&worker.models).insert(
        handle,
        Arc::new(Sessions {
            sessions: sessions.into_iter().map(Mutex::new).collect(),
        }),
    );
    Ok(WireMetadata {
        inputs: metadata.inputs,
        outputs: metadata.outputs,
    })
}

fn run_job(
    session: &mut Session,
    arena: &Arc<SharedArena>,
    slot: u32,
    inputs: Vec<WireTensor>,
) -> Result<Vec<WireTensor>> {
    let inputs = inputs
        .into_iter()
        .map(|input| {
            let bytes = match input.data {
                Placement::Slot { offset, len } => arena.view(slot, offset, len)?,
                Placement::Inline(data) => Bytes::from(data),
            };
            let shape = input.shape.iter().map(|&dim| dim as usize).collect();
            Ok(NamedTensor::new(
                input.name,
                Tensor::new(input.datatype, shape, bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = run_session(session, &inputs)?;
    // The inputs' views of the slot are gone before the outputs overwrite it.
    drop(inputs);
    let mut used = 0usize;
    outputs
        .into_iter()
        .map(|output| {
            let placement = place(arena, slot, &mut used, output.tensor.data())?;
            Ok(WireTensor {
                name: output.name,
                datatype: output.tensor.datatype(),
                shape: output.tensor.shape().iter().map(|&d| d as u64).collect(),
                data: placement,
            })
        })
        .collect()
}

/// What a probe found: each attempt and whether the sandbox stopped it.
#[derive(Debug, serde::Serialize)]
pub struct ProbeReport {
    pub sandbox: String,
    pub attempts: Vec<ProbeAttempt>,
}

#[derive(Debug, serde::Serialize)]
pub struct ProbeAttempt {
    pub what: String,
    pub allowed: bool,
    pub detail: String,
}

/// Test-only probe mode: closes exactly the sandbox a worker closes, then tries to open each
/// path and connect to each TCP address, and reports what got through.
pub fn probe(
    ort_library: &std::path::Path,
    policy: &SandboxPolicy,
    paths: &[PathBuf],
    connect: &[std::net::SocketAddr],
) -> Result<ProbeReport> {
    init_onnxruntime(ort_library, 0)?;
    let sandbox = sandbox::apply(policy)?;
    let mut attempts = Vec::new();
    for path in paths {
        let outcome = std::fs::File::open(path);
        attempts.push(ProbeAttempt {
            what: format!("open {}", path.display()),
            allowed: outcome.is_ok(),
            detail: outcome.err().map(|e| e.to_string()).unwrap_or_default(),
        });
        let listing = std::fs::read_dir(path.parent().unwrap_or(path));
        attempts.push(ProbeAttempt {
            what: format!("list the folder of {}", path.display()),
            allowed: listing.is_ok(),
            detail: listing.err().map(|e| e.to_string()).unwrap_or_default(),
        });
    }
    for address in connect {
        let outcome = std::net::TcpStream::connect(address);
        attempts.push(ProbeAttempt {
            what: format!("connect {address}"),
            allowed: outcome.is_ok(),
            detail: outcome.err().map(|e| e.to_string()).unwrap_or_default(),
        });
    }
    let parent = rustix::process::getppid();
    let signal = parent.map(rustix::process::test_kill_process);
    attempts.push(ProbeAttempt {
        what: "signal the parent process".into(),
        allowed: matches!(signal, Some(Ok(()))),
        detail: match signal {
            Some(Err(error)) => error.to_string(),
            _ => String::new(),
        },
    });
    let exec = std::process::Command::new("/bin/true").status();
    attempts.push(ProbeAttempt {
        what: "run /bin/true".into(),
        allowed: exec.is_ok(),
        detail: exec.err().map(|e| e.to_string()).unwrap_or_default(),
    });
    Ok(ProbeReport { sandbox, attempts })
}
