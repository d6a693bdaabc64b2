//! What every sink durably holds, for sources to ask at start-up.
//!
//! A source learns that its events are durable from acknowledgements, which are lost when the
//! process dies between the sinks' commits and the source recording them. For streamed changes
//! that costs nothing (the replay is recognised by position in every sink), but a PostgreSQL
//! snapshot taken again is a new snapshot, with new rows at new positions: Bronze would hold the
//! table twice. So while sources start, before any sink accepts anything, a source may ask
//! [`Durable::everywhere`] for the lowest position of a stream that every sink holds, the same
//! minimum the checkpoint coordinator acknowledges. Once every source has started, the pipeline
//! takes the sinks back ([`Durable::into_sinks`]) and later questions answer `None`.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::{Sink, SinkError};
use crate::event::{Position, StreamId};

/// The sinks while they are lent (`None` once taken back).
type Lent = Option<Vec<Box<dyn Sink>>>;

/// The sinks, lent to the sources while they start; cheap to clone.
#[derive(Clone)]
pub struct Durable {
    sinks: Arc<Mutex<Lent>>,
}

impl Durable {
    pub fn new(sinks: Vec<Box<dyn Sink>>) -> Self {
        Durable {
            sinks: Arc::new(Mutex::new(Some(sinks))),
        }
    }

    /// Nothing to ask (a source started outside a pipeline).
    pub fn none() -> Self {
        Durable {
            sinks: Arc::new(Mutex::new(None)),
        }
    }

    /// The highest position of `stream` of `source` durable in every sink: the minimum of what
    /// each holds, `None` when any holds nothing of it (or there are no sinks to ask).
    pub async fn everywhere(
        &self,
        source: &str,
        stream: &StreamId,
    ) -> Result<Option<Position>, SinkError> {
        let mut guard = self.sinks.lock().await;
        let Some(sinks) = guard.as_mut().filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let mut low: Option<Position> = None;
        for sink in sinks.iter_mut() {
            let Some(p) = sink.committed(source, stream).await? else {
                return Ok(None);
            };
            if low
                .as_ref()
                .is_none_or(|l| p.partial_cmp(l) == Some(std::cmp::Ordering::Less))
            {
                low = Some(p);
            }
        }
        Ok(low)
    }

    /// Takes the sinks back for delivery; every clone answers `None` from then on.
    pub async fn into_sinks(self) -> Vec<Box<dyn Sink>> {
        self.sinks.lock().await.take().unwrap_or_default()
    }
}
