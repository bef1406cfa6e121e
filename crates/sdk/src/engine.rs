//! The replay engine: one execution of a function for one call request.
//!
//! # Ownership (why nothing outlives the request)
//!
//! [`execute`] creates the run's state in an `Arc` that only it holds strongly. The handler's
//! future and every step handle see it through `Weak`, so the state's lifetime is exactly the
//! request's: when `execute` returns, the future is dropped (user code is *interrupted by
//! drop*, never parked), the state is emptied explicitly, and the last strong reference goes
//! with it. A handle kept by user code afterwards pins only the `Arc`'s 32-byte allocation,
//! and its methods answer [`Error::RunFinished`].
//!
//! # Scheduling
//!
//! The engine polls the handler's future itself. Step futures register a *slot* when they are
//! created (so ids follow code order), then wait for the engine to tell them what to do:
//! a memoised result is released one slot at a time in the server's completion order
//! (`ctx.stack.stack`), so `select!`-style races replay the way they first ran. When the
//! handler can make no more progress on memoised data, the new steps it is blocked on are
//! either executed (one lone `run` step, or the step a targeted call asks for) or reported
//! as ops for the server to schedule.
//!
//! # Checkpointing
//!
//! When the server allows it (a discovery call carrying `ctx.fn_id` and `ctx.qi_id`), a step
//! that ran here is saved to the server at once (`POST /v1/checkpoint/{run}/async`) and its
//! result handed straight back to the handler, which goes on to its next step in the same
//! request. Each result is stored before the code after it runs, as with a 206 answer; the
//! run just skips a server round trip and a replay per step. If a save fails, or the call has
//! run for `ServeOptions::checkpoint_max_runtime`, the step is reported in the classic 206
//! answer.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use cairn_protocol::step_id::StepIdCounter;
use cairn_protocol::{Memo, Op, Opcode, Userland};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use crate::client::{now_ms, Client};
use crate::ctx::RawInput;
use crate::function::ErasedHandler;
use crate::step::Step;
use crate::Error;

/// The shared cell behind step handles. `None` once the run's request has been answered.
pub(crate) type RunCell = Mutex<Option<Box<RunState>>>;

/// Everything one execution needs, owned by the request.
pub(crate) struct RunState {
    /// Memoised results not yet claimed by a step, keyed by hashed id.
    memo: Map<String, Value>,
    /// Position of each hashed id in `ctx.stack.stack` (the server's completion order).
    order: HashMap<String, usize>,
    counter: StepIdCounter,
    pub(crate) slots: Vec<Slot>,
    /// Slots holding a memoised result the engine has not released yet.
    waiting: Vec<usize>,
    pub(crate) client: Client,
}

/// What kind of step a slot is, with what it needs to be reported.
pub(crate) enum StepKind {
    Run,
    SendEvent,
    Sleep { name: String, opts: Value },
    WaitForEvent { event: String, opts: Value },
    Invoke { opts: Value },
}

impl StepKind {
    /// Run-type steps execute in the SDK; the rest are carried out by the server.
    fn runs_here(&self) -> bool {
        matches!(self, StepKind::Run | StepKind::SendEvent)
    }
}

pub(crate) enum SlotState {
    /// Has a memoised result; waits for its turn in completion order.
    Memoized {
        memo: Memo,
        order: usize,
    },
    /// Released to the step future.
    Released(Result<Value, Error>),
    /// No result yet: to be executed or reported.
    New,
    /// The engine asked the step future to run its closure.
    Execute,
    Executing,
    /// The closure finished; the request will answer with this (or checkpoint it).
    Executed(Result<Value, Error>),
    /// The result is being checkpointed; it is released once the server has stored it.
    Saving,
    Done,
}

pub(crate) struct Slot {
    hashed: String,
    user_id: String,
    index: Option<u32>,
    kind: StepKind,
    pub(crate) state: SlotState,
    pub(crate) waker: Option<Waker>,
}

impl RunState {
    /// Creates the slot for the next step with this user id, claiming its memo if any.
    pub(crate) fn register(&mut self, user_id: &str, kind: StepKind) -> usize {
        let resolved = self.counter.next(user_id);
        let memo = self
            .memo
            .remove(&resolved.hashed)
            .map(Memo::from_value)
            // An edited input (rerun) means the step has not run yet.
            .filter(|m| !matches!(m, Memo::Input(_)));
        let idx = self.slots.len();
        let state = match memo {
            Some(memo) => {
                self.waiting.push(idx);
                let order = self
                    .order
                    .get(&resolved.hashed)
                    .copied()
                    .unwrap_or(usize::MAX);
                SlotState::Memoized { memo, order }
            }
            None => SlotState::New,
        };
        self.slots.push(Slot {
            hashed: resolved.hashed,
            user_id: user_id.to_string(),
            index: resolved.index,
            kind,
            state,
            waker: None,
        });
        idx
    }

    /// Releases the memoised slot that completed earliest; returns its waker.
    fn release_next(&mut self) -> Option<Option<Waker>> {
        let (pos, _) =
            self.waiting
                .iter()
                .enumerate()
                .min_by_key(|(_, &i)| match self.slots[i].state {
                    SlotState::Memoized { order, .. } => (order, i),
                    _ => (usize::MAX, i),
                })?;
        let idx = self.waiting.swap_remove(pos);
        let slot = &mut self.slots[idx];
        let state = std::mem::replace(&mut slot.state, SlotState::Done);
        let SlotState::Memoized { memo, .. } = state else {
            slot.state = state;
            return Some(None);
        };
        let result = match memo {
            Memo::Data(v) | Memo::Raw(v) => Ok(v),
            Memo::Error(error) => Err(Error::Step(crate::error::StepError {
                step: slot.user_id.clone(),
                error,
            })),
            Memo::Input(_) => Ok(Value::Null),
        };
        slot.state = SlotState::Released(result);
        Some(slot.waker.take())
    }

    fn op(&self, idx: usize, code: Opcode) -> Op {
        let slot = &self.slots[idx];
        let (name, opts) = match &slot.kind {
            StepKind::Run => (slot.user_id.clone(), json!({})),
            StepKind::SendEvent => ("sendEvent".to_string(), json!({"type": "step.sendEvent"})),
            StepKind::Sleep { name, opts } => (name.clone(), opts.clone()),
            StepKind::WaitForEvent { event, opts } => (event.clone(), opts.clone()),
            StepKind::Invoke { opts } => (slot.user_id.clone(), opts.clone()),
        };
        let mut op = Op::new(slot.hashed.clone(), code);
        op.name = Some(name);
        op.display_name = Some(slot.user_id.clone());
        op.opts = Some(opts);
        op.userland = Some(Userland {
            id: slot.user_id.clone(),
            index: slot.index,
        });
        op
    }

    /// Starts saving slot `idx`'s successful result, if this call checkpoints and has time.
    fn checkpoint(&mut self, idx: usize, exec: &Exec, run_id: &str) -> Option<Saving> {
        let ck = exec.checkpoint.as_ref()?;
        if !matches!(self.slots[idx].state, SlotState::Executed(Ok(_)))
            || tokio::time::Instant::now() >= ck.until
        {
            return None;
        }
        let SlotState::Executed(Ok(data)) =
            std::mem::replace(&mut self.slots[idx].state, SlotState::Saving)
        else {
            unreachable!("matched above");
        };
        let mut op = self.op(idx, Opcode::StepRun);
        op.data = Some(data);
        let body = serde_json::to_vec(&CheckpointBody {
            run_id,
            fn_id: &ck.fn_id,
            qi_id: &ck.qi_id,
            steps: [&op],
            ts: now_ms(),
        })
        .expect("an op serialises");
        let client = self.client.clone();
        let run_id = run_id.to_string();
        Some(Saving {
            slot: idx,
            op: Box::new(op),
            save: Box::pin(
                async move { crate::api::checkpoint(&client, &run_id, body.into()).await },
            ),
        })
    }

    fn planned_op(&self, idx: usize) -> Op {
        let code = match self.slots[idx].kind {
            StepKind::Run | StepKind::SendEvent => Opcode::StepPlanned,
            StepKind::Sleep { .. } => Opcode::Sleep,
            StepKind::WaitForEvent { .. } => Opcode::WaitForEvent,
            StepKind::Invoke { .. } => Opcode::InvokeFunction,
        };
        self.op(idx, code)
    }

    /// The op answering for a step that ran in this request.
    fn ran(&mut self, idx: usize, exec: &Exec) -> Outcome {
        let SlotState::Executed(result) =
            std::mem::replace(&mut self.slots[idx].state, SlotState::Done)
        else {
            unreachable!("ran() is only called on executed slots");
        };
        match result {
            Ok(data) => {
                let mut op = self.op(idx, Opcode::StepRun);
                op.data = Some(data);
                Outcome::Ran {
                    op: Box::new(op),
                    retry_after: None,
                    no_retry: false,
                }
            }
            Err(err) => {
                let last_attempt = exec.max_attempts.is_some_and(|max| exec.attempt + 1 >= max);
                let final_ = last_attempt || !err.is_retriable();
                let mut user_error = err.to_user_error();
                if let Error::Step(s) = &err {
                    // A nested step failure: say which step, keep the original error.
                    user_error.message = format!("step {:?} failed: {}", s.step, s.error.message);
                }
                let mut op = self.op(
                    idx,
                    if final_ {
                        Opcode::StepFailed
                    } else {
                        Opcode::StepError
                    },
                );
                if final_ {
                    // The JS SDK also puts the error in `data`; servers memoise `error` either way.
                    op.data = serde_json::to_value(&user_error).ok();
                }
                op.error = Some(user_error);
                Outcome::Ran {
                    op: Box::new(op),
                    retry_after: err.retry_delay(),
                    no_retry: final_,
                }
            }
        }
    }
}

/// Per-call parameters of an execution.
pub(crate) struct Exec {
    /// Hashed id of the step a targeted call asks for; `None` for discovery (`stepId=step`).
    pub(crate) target: Option<String>,
    pub(crate) disable_immediate_execution: bool,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: Option<u32>,
    /// How long a targeted call waits for its step to appear before giving up.
    pub(crate) step_not_found_after: Duration,
    /// Where to save steps as they run; `None` answers every executed step with a 206.
    pub(crate) checkpoint: Option<Checkpoint>,
}

/// What a checkpointing discovery call needs to save its steps (protocol §13.2).
pub(crate) struct Checkpoint {
    pub(crate) fn_id: String,
    /// The server's reference to this call; a superseded call's saves are refused.
    pub(crate) qi_id: String,
    /// After this, executed steps are answered with a 206 instead.
    pub(crate) until: tokio::time::Instant,
}

/// A checkpoint in flight: the step's op (answered with if the save fails) and the save.
struct Saving {
    slot: usize,
    op: Box<Op>,
    save: Pin<Box<dyn Future<Output = bool> + Send>>,
}

#[derive(serde::Serialize)]
struct CheckpointBody<'a> {
    run_id: &'a str,
    fn_id: &'a str,
    qi_id: &'a str,
    steps: [&'a Op; 1],
    ts: i64,
}

/// How the request is answered.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The function returned: 200 with its output.
    Complete(Value),
    /// The function returned an error: 500 or 400.
    Failed(Error),
    /// A step ran in this request: 206 with one op.
    Ran {
        op: Box<Op>,
        retry_after: Option<Duration>,
        no_retry: bool,
    },
    /// New steps for the server to schedule: 206 with these ops.
    Planned(Vec<Op>),
    /// A targeted call never reached its step: 500.
    StepNotFound {
        requested: String,
        found: Vec<Value>,
    },
}

/// The input of one execution, already parsed.
pub(crate) struct Input {
    pub(crate) event: cairn_protocol::Event,
    pub(crate) events: Vec<cairn_protocol::Event>,
    pub(crate) steps: Map<String, Value>,
    pub(crate) stack: Vec<String>,
    pub(crate) run_id: String,
}

/// Runs `handler` against one call request and decides the answer.
///
/// Everything run-scoped is created here and dropped before this returns.
pub(crate) async fn execute(
    handler: &ErasedHandler,
    client: &Client,
    input: Input,
    exec: Exec,
) -> Outcome {
    let order = input
        .stack
        .into_iter()
        .enumerate()
        .map(|(i, h)| (h, i))
        .collect();
    let cell: Arc<RunCell> = Arc::new(Mutex::new(Some(Box::new(RunState {
        memo: input.steps,
        order,
        counter: StepIdCounter::default(),
        slots: Vec::new(),
        waiting: Vec::new(),
        client: client.clone(),
    }))));
    let run_id = input.run_id;
    let raw = RawInput {
        event: input.event,
        events: input.events,
        run_id: run_id.clone(),
        attempt: exec.attempt,
        max_attempts: exec.max_attempts,
        step: Step::new(Arc::downgrade(&cell)),
    };
    let mut fut = handler(raw);
    let mut not_found_timer = None;
    let mut saving = None;
    let outcome = poll_fn(|cx| {
        drive(
            &cell,
            fut.as_mut(),
            cx,
            &exec,
            &run_id,
            &mut not_found_timer,
            &mut saving,
        )
    })
    .await;
    // Interrupt the user's code now: its destructors run and its captures are freed.
    drop(fut);
    // Defence in depth: empty the state even if something still holds the Arc.
    let state = cell.lock().take();
    drop(state);
    outcome
}

fn drive(
    cell: &Arc<RunCell>,
    mut fut: Pin<&mut (dyn Future<Output = Result<Value, Error>> + Send)>,
    cx: &mut Context<'_>,
    exec: &Exec,
    run_id: &str,
    not_found_timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    saving: &mut Option<Saving>,
) -> Poll<Outcome> {
    loop {
        if let Some(s) = saving.as_mut() {
            let Poll::Ready(saved) = s.save.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            let Saving { slot, mut op, .. } = saving.take().expect("checked above");
            if !saved {
                return Poll::Ready(Outcome::Ran {
                    op,
                    retry_after: None,
                    no_retry: false,
                });
            }
            // Stored: the handler goes on with the result, as a replay would give it.
            let data = op.data.take().unwrap_or(Value::Null);
            let waker = {
                let mut guard = cell.lock();
                let st = guard
                    .as_mut()
                    .expect("run state lives until execute() returns");
                st.slots[slot].state = SlotState::Released(Ok(data));
                st.slots[slot].waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
        if let Poll::Ready(result) = fut.as_mut().poll(cx) {
            return Poll::Ready(match result {
                Ok(v) => Outcome::Complete(v),
                Err(e) => Outcome::Failed(e),
            });
        }
        let mut guard = cell.lock();
        let st = guard
            .as_mut()
            .expect("run state lives until execute() returns");

        if let Some(i) = st
            .slots
            .iter()
            .position(|s| matches!(s.state, SlotState::Executed(_)))
        {
            if let Some(s) = st.checkpoint(i, exec, run_id) {
                *saving = Some(s);
                continue;
            }
            return Poll::Ready(st.ran(i, exec));
        }
        if let Some(waker) = st.release_next() {
            drop(guard);
            if let Some(w) = waker {
                w.wake();
            }
            continue;
        }
        if st
            .slots
            .iter()
            .any(|s| matches!(s.state, SlotState::Executing))
        {
            // A step is running and awaits I/O; its waker brings us back.
            return Poll::Pending;
        }
        if let Some(slot) = st
            .slots
            .iter()
            .find(|s| matches!(s.state, SlotState::Execute))
        {
            // Told to run, but the handler has not polled it (it awaits something else
            // first). Its closure lives in its future, so only a poll can start it: wait a
            // while for one, then give up rather than hold the request forever.
            let timer = not_found_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(exec.step_not_found_after)));
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Outcome::Failed(Error::msg(format!(
                    "step {:?} was due to run but the function never awaited it",
                    slot.user_id
                ))));
            }
            return Poll::Pending;
        }

        if let Some(target) = &exec.target {
            let found = st
                .slots
                .iter()
                .position(|s| &s.hashed == target && matches!(s.state, SlotState::New));
            if let Some(i) = found {
                if !st.slots[i].kind.runs_here() {
                    return Poll::Ready(Outcome::Failed(Error::non_retriable(format!(
                        "step {:?} cannot be executed by the SDK",
                        st.slots[i].user_id
                    ))));
                }
                st.slots[i].state = SlotState::Execute;
                let waker = st.slots[i].waker.take();
                drop(guard);
                if let Some(w) = waker {
                    w.wake();
                }
                continue;
            }
            let blocked_on_steps = st.slots.iter().any(|s| matches!(s.state, SlotState::New));
            if blocked_on_steps {
                // The handler waits on steps other than the target. It may still reach the
                // target after some I/O of its own, so give it a while, as the JS SDK does.
                let timer = not_found_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(exec.step_not_found_after)));
                if timer.as_mut().poll(cx).is_ready() {
                    let found = st
                        .slots
                        .iter()
                        .map(|s| json!({"id": s.hashed, "name": s.user_id, "displayName": s.user_id}))
                        .collect();
                    return Poll::Ready(Outcome::StepNotFound {
                        requested: target.clone(),
                        found,
                    });
                }
            }
            return Poll::Pending;
        }

        let new: Vec<usize> = st
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, SlotState::New))
            .map(|(i, _)| i)
            .collect();
        if new.is_empty() {
            // The handler awaits something of its own (a timer, an HTTP call).
            return Poll::Pending;
        }
        if let [only] = new[..] {
            let slot = &mut st.slots[only];
            // Run a lone step right away, saving the server a round trip. Only if the handler
            // has polled it: a step created but not awaited might never be polled again.
            if slot.kind.runs_here() && !exec.disable_immediate_execution && slot.waker.is_some() {
                slot.state = SlotState::Execute;
                let waker = slot.waker.take();
                drop(guard);
                if let Some(w) = waker {
                    w.wake();
                }
                continue;
            }
        }
        let ops = new.into_iter().map(|i| st.planned_op(i)).collect();
        return Poll::Ready(Outcome::Planned(ops));
    }
}

/// A step future's view of its slot.
pub(crate) enum SlotPoll {
    /// The memoised result (or the step's failure).
    Ready(Result<Value, Error>),
    /// Run the closure now.
    Execute,
    Pending,
    /// The request that owned the run has been answered.
    Finished,
}

/// A registered step: a weak reference to the run and the slot's index.
pub(crate) struct Registration {
    pub(crate) run: std::sync::Weak<RunCell>,
    pub(crate) slot: usize,
}

impl Registration {
    pub(crate) fn poll_slot(&self, cx: &mut Context<'_>) -> SlotPoll {
        let Some(cell) = self.run.upgrade() else {
            return SlotPoll::Finished;
        };
        let mut guard = cell.lock();
        let Some(st) = guard.as_mut() else {
            return SlotPoll::Finished;
        };
        let Some(slot) = st.slots.get_mut(self.slot) else {
            return SlotPoll::Finished;
        };
        match std::mem::replace(&mut slot.state, SlotState::Done) {
            SlotState::Released(result) => SlotPoll::Ready(result),
            SlotState::Execute => {
                slot.state = SlotState::Executing;
                SlotPoll::Execute
            }
            other => {
                slot.state = other;
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                SlotPoll::Pending
            }
        }
    }

    /// Records the result of an executed closure; the engine answers with it.
    pub(crate) fn complete(&self, result: Result<Value, Error>) {
        if let Some(cell) = self.run.upgrade() {
            if let Some(st) = cell.lock().as_mut() {
                if let Some(slot) = st.slots.get_mut(self.slot) {
                    slot.state = SlotState::Executed(result);
                }
            }
        }
    }
}
