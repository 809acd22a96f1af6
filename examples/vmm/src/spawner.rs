//! The thread that creates the virtio device workers (`ember-spawner`).
//!
//! A device starts its worker when the guest's driver sets DRIVER_OK, on the vCPU
//! thread that made that write, and a new thread inherits the seccomp filter of the
//! thread that creates it. Creating the workers here instead keeps the vCPU filter to
//! what a vCPU does: this thread is started before any filter, installs its own (which
//! allows thread creation and what the workers do), and does nothing but create
//! threads on request; it never touches guest input.

use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use ember_virtio::{ThreadHook, ThreadSpawner};

/// A request: the thread's name, its body, and where the handle goes.
type Request = (
    String,
    Box<dyn FnOnce() + Send + 'static>,
    mpsc::SyncSender<io::Result<JoinHandle<()>>>,
);

/// Asks the spawner thread for threads. The thread ends when the last handle goes.
pub struct Spawner {
    requests: Mutex<mpsc::Sender<Request>>,
}

impl Spawner {
    /// Starts the spawner thread; it runs `hook` (its seccomp filter) first. Call before
    /// any thread installs a filter, so that this one inherits none.
    pub fn start(hook: Option<ThreadHook>) -> io::Result<Arc<Spawner>> {
        const NAME: &str = "ember-spawner";
        let (send, requests) = mpsc::channel::<Request>();
        let (started_send, started) = mpsc::sync_channel::<io::Result<()>>(1);
        std::thread::Builder::new()
            .name(NAME.to_string())
            .spawn(move || {
                let hooked = hook.as_ref().map_or(Ok(()), |hook| hook(NAME));
                let go = hooked.is_ok();
                let _ = started_send.send(hooked);
                if !go {
                    return;
                }
                for (name, body, reply) in requests {
                    let _ = reply.send(std::thread::Builder::new().name(name).spawn(body));
                }
            })?;
        started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the spawner thread exited at once")))?;
        Ok(Arc::new(Spawner {
            requests: Mutex::new(send),
        }))
    }
}

impl ThreadSpawner for Spawner {
    fn spawn(
        &self,
        name: String,
        body: Box<dyn FnOnce() + Send + 'static>,
    ) -> io::Result<JoinHandle<()>> {
        let gone = || io::Error::other("the spawner thread is gone");
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .lock()
            .map_err(|_| gone())?
            .send((name, body, reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_come_from_the_spawner_thread_with_their_names() {
        let hooked = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&hooked);
        let hook: ThreadHook = Arc::new(move |name: &str| {
            record.lock().unwrap().push(name.to_string());
            Ok(())
        });
        let spawner = Spawner::start(Some(hook)).unwrap();
        let (send, names) = mpsc::channel();
        let thread = spawner
            .spawn(
                "ember-virtio-test".to_string(),
                Box::new(move || {
                    let _ = send.send(std::thread::current().name().map(str::to_owned));
                }),
            )
            .unwrap();
        thread.join().unwrap();
        assert_eq!(names.recv().unwrap().as_deref(), Some("ember-virtio-test"));
        assert_eq!(*hooked.lock().unwrap(), ["ember-spawner"]);
    }

    #[test]
    fn a_failing_hook_is_a_start_error() {
        let hook: ThreadHook = Arc::new(|_: &str| Err(io::Error::other("no filter")));
        let err = Spawner::start(Some(hook)).err().unwrap();
        assert_eq!(err.to_string(), "no filter");
    }
}
