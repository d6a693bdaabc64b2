//! A transaction's raw pgoutput messages, held until its commit: in memory up to a bound, then
//! appended to an anonymous temporary file, so a transaction of any size costs bounded memory.
//!
//! Messages are kept undecoded (framed as `xid u32 | len u32 | bytes`) and decoded only when the
//! transaction commits and its changes are handed out a batch at a time. A streamed transaction
//! (protocol v2) may abort a subtransaction: its id is remembered and its messages are skipped on
//! replay, so nothing is rewritten.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

pub struct TxBuffer {
    mem: Vec<u8>,
    limit: usize,
    spill_dir: Option<PathBuf>,
    spill: Option<BufWriter<File>>,
    spilled_bytes: u64,
    aborted: HashSet<u32>,
    /// Messages were sent inside stream blocks (changes carry their xid).
    pub streamed: bool,
    messages: u64,
}

impl TxBuffer {
    pub fn new(limit: usize, spill_dir: Option<PathBuf>, streamed: bool) -> Self {
        TxBuffer {
            mem: Vec::new(),
            limit,
            spill_dir,
            spill: None,
            spilled_bytes: 0,
            aborted: HashSet::new(),
            streamed,
            messages: 0,
        }
    }

    pub fn push(&mut self, xid: u32, data: &[u8]) -> io::Result<()> {
        // Spill before the buffer would pass the bound (so it never grows its capacity past it).
        if !self.mem.is_empty() && self.mem.len() + data.len() + 8 > self.limit {
            self.flush_to_disk()?;
        }
        self.mem.extend_from_slice(&xid.to_le_bytes());
        self.mem
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.mem.extend_from_slice(data);
        self.messages += 1;
        Ok(())
    }

    fn flush_to_disk(&mut self) -> io::Result<()> {
        if self.spill.is_none() {
            let file = match &self.spill_dir {
                Some(dir) => tempfile::tempfile_in(dir)?,
                None => tempfile::tempfile()?,
            };
            self.spill = Some(BufWriter::with_capacity(1 << 20, file));
        }
        let w = self.spill.as_mut().expect("spill file was just opened");
        w.write_all(&self.mem)?;
        self.spilled_bytes += self.mem.len() as u64;
        self.mem.clear();
        // Give the memory back: the next chunk of a huge transaction goes to disk too.
        self.mem.shrink_to(self.limit.min(1 << 20));
        Ok(())
    }

    /// Skips a rolled-back subtransaction's messages on replay.
    pub fn abort_subtransaction(&mut self, subxid: u32) {
        self.aborted.insert(subxid);
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Starts reading the messages back in order (spilled part first, then memory).
    pub fn into_replay(self) -> io::Result<Replay> {
        let file = match self.spill {
            Some(w) => {
                let mut f = w.into_inner().map_err(|e| e.into_error())?;
                f.seek(SeekFrom::Start(0))?;
                Some(BufReader::with_capacity(1 << 20, f))
            }
            None => None,
        };
        Ok(Replay {
            file,
            mem: self.mem,
            mem_pos: 0,
            aborted: self.aborted,
            streamed: self.streamed,
        })
    }
}

pub struct Replay {
    file: Option<BufReader<File>>,
    mem: Vec<u8>,
    mem_pos: usize,
    aborted: HashSet<u32>,
    pub streamed: bool,
}

impl Replay {
    /// The next message into `buf`; `false` at the end.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        loop {
            let xid = if let Some(f) = &mut self.file {
                let mut head = [0u8; 8];
                match f.read_exact(&mut head) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.file = None;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                let xid = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
                let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
                buf.resize(len, 0);
                f.read_exact(buf)?;
                xid
            } else {
                if self.mem_pos >= self.mem.len() {
                    return Ok(false);
                }
                let m = &self.mem[self.mem_pos..];
                let xid = u32::from_le_bytes(m[..4].try_into().expect("4 bytes"));
                let len = u32::from_le_bytes(m[4..8].try_into().expect("4 bytes")) as usize;
                buf.clear();
                buf.extend_from_slice(&m[8..8 + len]);
                self.mem_pos += 8 + len;
                xid
            };
            if !self.aborted.contains(&xid) {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(mut r: Replay) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while r.next_into(&mut buf).unwrap() {
            out.push(buf.clone());
        }
        out
    }

    #[test]
    fn spills_past_the_bound_and_replays_in_order() {
        let mut b = TxBuffer::new(64, None, false);
        let msgs: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_be_bytes().repeat(3)).collect();
        for m in &msgs {
            b.push(7, m).unwrap();
        }
        assert!(b.spilled_bytes() > 0, "a 64-byte bound must spill");
        assert!(b.mem.len() <= 64);
        assert_eq!(drain(b.into_replay().unwrap()), msgs);
    }

    #[test]
    fn aborted_subtransactions_are_skipped() {
        let mut b = TxBuffer::new(1 << 20, None, true);
        b.push(1, b"a").unwrap();
        b.push(2, b"b").unwrap();
        b.push(1, b"c").unwrap();
        b.abort_subtransaction(2);
        assert_eq!(
            drain(b.into_replay().unwrap()),
            vec![b"a".to_vec(), b"c".to_vec()]
        );
    }
}
