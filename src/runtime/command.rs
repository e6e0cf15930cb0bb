//! The `command` runtime. Per item (the default): one process per work item, the work item as
//! JSON on stdin, one JSON object on stdout. Long-lived (`long_lived: true`): one process per
//! concurrency slot stays up and answers one JSON line per work-item line; a process that dies,
//! prints something that is not a JSON object or overruns the card's timeout fails that item and
//! is replaced by a fresh one for the next. Long-lived processes run with
//! `SWITCHYARD_LONG_LIVED=1`, so one program can serve both modes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::agent::{not_runnable, Failure, Reply};
use crate::cards::{Card, Runtime};
use crate::envelope::WorkItem;
use crate::error::Result;

/// Runs a card's `command` runtime. A top-level numeric `confidence` in the output becomes the
/// result's confidence.
#[derive(Clone)]
pub struct CommandHandler {
    program: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    dir: PathBuf,
    timeout: Duration,
    /// Long-lived: the processes waiting for their next item.
    idle: Option<Arc<Mutex<Vec<Worker>>>>,
}

/// A long-lived process with its pipes.
struct Worker {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl CommandHandler {
    /// The handler for `card`, loaded from a file in `dir` (relative paths resolve there).
    pub fn new(card: &Card, dir: PathBuf) -> Result<Self> {
        let Runtime::Command {
            command,
            env,
            long_lived,
        } = &card.runtime
        else {
            return Err(not_runnable(card));
        };
        Ok(Self {
            program: command[0].clone(),
            args: command[1..].to_vec(),
            env: env.clone(),
            dir,
            timeout: card.timeout,
            idle: long_lived.then(Arc::default),
        })
    }

    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.program);
        if self.idle.is_some() {
            command.env("SWITCHYARD_LONG_LIVED", "1");
        }
        command
            .args(&self.args)
            .envs(&self.env)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    async fn once(&self, item: &WorkItem) -> Result<Reply, Failure> {
        let mut child = self
            .command()
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", self.program))?;
        let input = serde_json::to_vec(item).map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read its input closes the pipe early; its exit decides.
            match stdin.write_all(&input).await {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(format!("cannot write the work item: {e}").into());
                }
                _ => {}
            }
        }
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| format!("timed out after {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: String = stderr
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(format!(
                "`{}` exited with {}: {}",
                self.program,
                output.status,
                tail.trim()
            )
            .into());
        }
        self.reply(&output.stdout)
    }

    /// One item through a long-lived process: an idle one, or a new one.
    async fn line(&self, idle: &Mutex<Vec<Worker>>, item: &WorkItem) -> Result<Reply, Failure> {
        let waiting = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut worker = match waiting {
            Some(worker) => worker,
            None => {
                let mut child = self
                    .command()
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| format!("cannot start `{}`: {e}", self.program))?;
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err("the process has no pipes".into());
                };
                Worker {
                    _child: child,
                    stdin,
                    stdout: BufReader::new(stdout),
                }
            }
        };
        let mut input = serde_json::to_vec(item).map_err(|e| e.to_string())?;
        input.push(b'\n');
        let exchange = async {
            worker.stdin.write_all(&input).await?;
            worker.stdin.flush().await?;
            let mut answer = String::new();
            worker.stdout.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        // On any failure the worker is dropped, which kills its process; the next item starts a
        // fresh one.
        let answer = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => return Err(format!("timed out after {:?}", self.timeout).into()),
            Ok(Err(e)) => return Err(format!("`{}` failed mid-item: {e}", self.program).into()),
            Ok(Ok(answer)) if answer.is_empty() => {
                return Err(format!("`{}` exited mid-item", self.program).into())
            }
            Ok(Ok(answer)) => answer,
        };
        let reply = self.reply(answer.as_bytes())?;
        idle.lock().unwrap_or_else(|e| e.into_inner()).push(worker);
        Ok(reply)
    }

    fn reply(&self, output: &[u8]) -> Result<Reply, Failure> {
        let payload: Value = serde_json::from_slice(output)
            .map_err(|e| format!("`{}` did not print a JSON object: {e}", self.program))?;
        if !payload.is_object() {
            return Err(format!("`{}` printed JSON that is not an object", self.program).into());
        }
        let confidence = payload.get("confidence").and_then(Value::as_f64);
        Ok(Reply {
            payload,
            confidence,
            usage: None,
        })
    }

    async fn answer(&self, item: &WorkItem) -> Result<Reply, Failure> {
        match &self.idle {
            Some(idle) => self.line(idle, item).await,
            None => self.once(item).await,
        }
    }
}

impl super::Runner for CommandHandler {
    async fn run(&self, item: &WorkItem) -> Result<Reply, Failure> {
        self.answer(item).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> WorkItem {
        WorkItem {
            task_id: "t".into(),
            tenant: "default".into(),
            step_id: 1,
            attempt: 1,
            card: "c".into(),
            input: serde_json::json!({"message": "hi"}),
            context: BTreeMap::new(),
            labels: BTreeMap::new(),
            deadline: None,
            reply_partition: 0,
        }
    }

    fn handler(script: &str, long_lived: bool) -> CommandHandler {
        CommandHandler {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::new(),
            dir: std::env::temp_dir(),
            timeout: Duration::from_secs(5),
            idle: long_lived.then(Arc::default),
        }
    }

    #[tokio::test]
    async fn command_reads_stdin_and_prints_json() {
        let reply = handler(
            r#"cat >/dev/null; echo '{"ok": true, "confidence": 0.7}'"#,
            false,
        )
        .answer(&item())
        .await
        .unwrap();
        assert_eq!(reply.payload["ok"], true);
        assert_eq!(reply.confidence, Some(0.7));
    }

    #[tokio::test]
    async fn non_zero_exit_and_bad_json_fail() {
        let err = handler("echo boom >&2; exit 3", false)
            .answer(&item())
            .await
            .unwrap_err()
            .reason;
        assert!(
            err.contains("boom") && err.contains("exit status: 3"),
            "{err}"
        );
        let err = handler("echo not-json", false)
            .answer(&item())
            .await
            .unwrap_err();
        assert!(
            err.reason.contains("did not print a JSON object"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_long_lived_process_answers_many_items_and_a_crash_fails_one_item_only() {
        // Answers each line with its own pid and a counter; the third item kills it.
        let script = r#"n=0; while read line; do n=$((n+1)); if [ $n -eq 3 ]; then exit 1; fi; echo "{\"pid\": $$, \"n\": $n}"; done"#;
        let h = handler(script, true);
        let first = h.answer(&item()).await.unwrap().payload;
        let second = h.answer(&item()).await.unwrap().payload;
        assert_eq!(first["pid"], second["pid"], "one process answered both");
        assert_eq!(second["n"], 2);
        let crashed = h.answer(&item()).await.unwrap_err();
        assert!(
            crashed.retryable && crashed.reason.contains("exited mid-item"),
            "{crashed:?}"
        );
        let fresh = h.answer(&item()).await.unwrap().payload;
        assert_ne!(
            fresh["pid"], first["pid"],
            "a fresh process for the next item"
        );
        assert_eq!(fresh["n"], 1);
    }

    #[tokio::test]
    async fn a_long_lived_process_that_hangs_fails_at_the_timeout_and_is_replaced() {
        let script = r#"while read line; do case "$line" in *slow*) sleep 30;; esac; echo "{\"pid\": $$}"; done"#;
        let mut h = handler(script, true);
        h.timeout = Duration::from_millis(500);
        let mut slow = item();
        slow.input = serde_json::json!({"message": "slow"});
        let first = h.answer(&item()).await.unwrap().payload;
        let err = h.answer(&slow).await.unwrap_err();
        assert!(err.reason.contains("timed out"), "{err:?}");
        let next = h.answer(&item()).await.unwrap().payload;
        assert_ne!(next["pid"], first["pid"]);
    }
}
