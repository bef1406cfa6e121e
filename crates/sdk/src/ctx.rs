//! What a handler receives.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::step::Step;
use crate::{Error, Event};

/// Untyped input, built by the engine for one request.
pub(crate) struct RawInput {
    pub(crate) event: cairn_protocol::Event,
    pub(crate) events: Vec<cairn_protocol::Event>,
    pub(crate) run_id: String,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) step: Step,
}

/// The input of one execution of a function.
///
/// The fields are plain data, copied out of the request for the handler to own. The step
/// tools ([`Ctx::step`]) are a weak handle: keeping a `Ctx` or a [`Step`] after the request
/// keeps only those copies and a few bytes alive, never the run's memoised outputs, the
/// request body or the handler's future. Using the step tools afterwards returns
/// [`Error::RunFinished`].
#[derive(Clone)]
pub struct Ctx<T = Value> {
    /// The event that triggered the run (the first of a batch).
    pub event: Event<T>,
    /// The rest of a batch; empty unless the function batches events, so a run's single
    /// event is held once.
    batch_rest: Vec<Event<T>>,
    /// The run's id (a ULID).
    pub run_id: String,
    /// 0-based attempt of the current step or discovery call.
    pub attempt: u32,
    /// Attempts the server allows this call, when it says.
    pub max_attempts: Option<u32>,
    step: Step,
}

impl<T> Ctx<T> {
    /// The step tools. Cheap: a weak handle to the run.
    pub fn step(&self) -> Step {
        self.step.clone()
    }

    /// Every event of the run, in order: just [`Ctx::event`] unless the function batches
    /// events.
    pub fn events(&self) -> impl Iterator<Item = &Event<T>> {
        std::iter::once(&self.event).chain(self.batch_rest.iter())
    }
}

impl<T: DeserializeOwned> Ctx<T> {
    pub(crate) fn from_raw(raw: RawInput) -> Result<Self, Error> {
        // `events[0]` is the triggering event again; type it once.
        let event = Event::from_wire(raw.event)?;
        let batch_rest = raw
            .events
            .into_iter()
            .skip(1)
            .map(Event::from_wire)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Ctx {
            event,
            batch_rest,
            run_id: raw.run_id,
            attempt: raw.attempt,
            max_attempts: raw.max_attempts,
            step: raw.step,
        })
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Ctx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("event", &self.event)
            .field("run_id", &self.run_id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}
