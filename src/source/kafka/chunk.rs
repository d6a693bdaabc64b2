//! Messages copied out of librdkafka in chunks, the unit handed from the receive loop to the
//! decode tasks.
//!
//! A chunk keeps its messages in the order they were received; its keys and payloads share one
//! buffer, so a chunk costs one allocation instead of two per message.

use std::ops::Range;

use rdkafka::Timestamp;
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::event::TimestampType;

/// Messages handed over per chunk and events per channel message: one wake-up of the next task
/// per batch, not per event (waking a parked task costs more than decoding a message).
pub const MAX_BATCH: usize = 512;

/// Messages copied out of librdkafka's buffers, on their way to the decode task. Their keys and
/// payloads share one buffer: one allocation per chunk instead of two per message (and fewer
/// frees on the decode task's core of memory allocated on this one).
pub(super) struct Chunk {
    pub(super) bytes: Vec<u8>,
    pub(super) messages: Vec<Copied>,
}

/// A message of a [`Chunk`].
pub(super) struct Copied {
    /// Index of the topic in the subscribed topics.
    pub(super) topic: usize,
    pub(super) partition: i32,
    pub(super) offset: i64,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    pub(super) timestamp_ms: Option<i64>,
    pub(super) timestamp_type: Option<TimestampType>,
    pub(super) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Chunk {
    pub(super) fn with_capacity(bytes: usize) -> Self {
        Chunk {
            bytes: Vec::with_capacity(bytes),
            messages: Vec::with_capacity(MAX_BATCH),
        }
    }

    pub(super) fn push(&mut self, topic: usize, m: &BorrowedMessage<'_>) {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let key = m.key().map(|k| self.copy(k));
        let payload = m.payload().map(|p| self.copy(p));
        self.messages.push(Copied {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key,
            payload,
            timestamp_ms: m.timestamp().to_millis(),
            timestamp_type: match m.timestamp() {
                Timestamp::NotAvailable => None,
                Timestamp::CreateTime(_) => Some(TimestampType::CreateTime),
                Timestamp::LogAppendTime(_) => Some(TimestampType::LogAppendTime),
            },
            headers,
        });
    }

    fn copy(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    pub(super) fn key(&self, m: &Copied) -> Option<&[u8]> {
        m.key.clone().map(|r| &self.bytes[r])
    }

    pub(super) fn payload(&self, m: &Copied) -> Option<&[u8]> {
        m.payload.clone().map(|r| &self.bytes[r])
    }
}
