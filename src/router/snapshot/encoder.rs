//! The thread snapshots are encoded on: one, at the lowest CPU priority, so that a snapshot
//! takes the time the router's threads leave idle instead of theirs.
//!
//! Encoding a partition of 70,000 open tasks takes 0.3-1 s of CPU (JSON and its checksum). With
//! every partition's snapshot encoded at once on tokio's blocking threads, at the priority of
//! the router's own, snapshots every 3 s held a two-core router's latency p99 at 60-261 ms at
//! 34,000 events/s; one at a time on this thread, 18-58 ms (`benches/routing.rs`, README).

use std::sync::mpsc;

use tokio::sync::oneshot;

/// The encoding thread's nice value: the lowest priority, the one RocksDB gives its background
/// threads (`CpuPriority::kLow`). A busy router still leaves it the idle time of its cores.
const NICE: i32 = 19;

/// One piece of work for the thread.
type Job = Box<dyn FnOnce() + Send>;

/// A handle on the encoding thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Encoder {
    jobs: mpsc::Sender<Job>,
}

impl Encoder {
    /// Starts the thread.
    pub fn start() -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("snapshot-encoder".into())
            .spawn(move || {
                lower_priority();
                for job in queue {
                    job();
                }
            })
            .expect("the snapshot encoder thread starts");
        Self { jobs }
    }

    /// Runs `work` on the thread, after the work handed over before it, and returns its result.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = done.send(work());
            }))
            .expect("the encoder thread lives while a handle does");
        result.await.expect("encoding a snapshot does not panic")
    }
}

/// Gives the calling thread the lowest CPU priority. On Linux a nice value belongs to one
/// thread (setpriority(2), NOTES), so the router's other threads keep theirs.
#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: plain system calls on the calling thread; no memory is shared with them.
    let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) };
    if set != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "the snapshot encoder keeps the router's CPU priority: snapshots may slow routing"
        );
    }
}

/// Elsewhere the thread keeps the process's priority.
#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_in_order_on_one_low_priority_thread() {
        let encoder = Encoder::start();
        let first = encoder.run(|| (std::thread::current().id(), 1)).await;
        let second = encoder
            .clone()
            .run(|| (std::thread::current().id(), 2))
            .await;
        assert_eq!((first.0, first.1, second.1), (second.0, 1, 2));
        assert_ne!(first.0, std::thread::current().id());
        #[cfg(target_os = "linux")]
        {
            let nice = encoder
                .run(|| {
                    // SAFETY: reads the calling thread's nice value.
                    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
                })
                .await;
            assert_eq!(nice, NICE, "the encoder runs at the lowest priority");
        }
    }
}
