//! Helpers shared by the fuzz targets and `strict_dump`: input splitting and a sink that
//! records what the strict reader reports, checking values as `DataSet::read` does.

use pacsgate::dicom::reader::{Sink, TopElement, Violation};
use pacsgate::dicom::values;

/// Chunk sizes for feeding input in pieces, derived from one seed byte: 0 means one byte at a
/// time; other seeds give a varying mix of sizes from 1 to 64 (and now and then empty pieces).
pub struct Splitter {
    state: u32,
    fixed: Option<usize>,
}

impl Splitter {
    pub fn new(seed: u8) -> Splitter {
        Splitter {
            state: 0x9E37_79B9 ^ (seed as u32).wrapping_mul(0x0101_0101),
            fixed: (seed == 0).then_some(1),
        }
    }

    pub fn next_len(&mut self) -> usize {
        if let Some(n) = self.fixed {
            return n;
        }
        // xorshift32
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        match x % 16 {
            0 => 0,
            1..=7 => 1 + (x >> 8) as usize % 8,
            _ => 1 + (x >> 8) as usize % 64,
        }
    }

    /// Splits `data` into pieces (their concatenation is `data`).
    pub fn split<'a>(&mut self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let n = self.next_len().min(data.len());
            let (a, b) = data.split_at(n);
            out.push(a);
            data = b;
        }
        out
    }
}

/// One top-level element as reported to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub element: TopElement,
    pub value: Vec<u8>,
    pub end: Option<u64>,
}

/// Records every top-level element with its value, and checks values as `DataSet::read`
/// does (`values::check` for plain values; a judged attribute must not be a container).
#[derive(Default)]
pub struct Record {
    pub seen: Vec<Seen>,
}

impl Sink for Record {
    fn begin(&mut self, e: &TopElement) -> Result<bool, Violation> {
        self.seen.push(Seen {
            element: *e,
            value: Vec::new(),
            end: None,
        });
        Ok(!e.container)
    }
    fn value(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        if let Some(s) = self.seen.last_mut() {
            s.value.extend_from_slice(bytes);
        }
        Ok(())
    }
    fn end(&mut self, end: u64) -> Result<(), Violation> {
        let Some(s) = self.seen.last_mut() else {
            return Ok(());
        };
        s.end = Some(end);
        if !s.element.container {
            values::check(s.element.tag, s.element.vr, &s.value)?;
        } else if values::judged(s.element.tag).is_some() {
            return Err(Violation::NotAllowed(s.element.tag));
        }
        Ok(())
    }
}

/// Whether `PACSGATE_FUZZ_VERBOSE` is set: targets then print their verdicts (to check that
/// seeds reach what they are meant to, and to read a reproducer's path).
pub fn verbose() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var_os("PACSGATE_FUZZ_VERBOSE").is_some())
}
