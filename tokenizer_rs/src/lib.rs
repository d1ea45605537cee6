//! `jaxchat.rustbpe`: a byte-level BPE trainer with the GPT-4 style split, for Python.
//!
//! Training reads text from a Python iterator in batches, splits and counts chunks in parallel
//! with the GIL released, then learns merges with the incremental algorithm in `bpe`.
//! Inference is meant for tiktoken (`get_mergeable_ranks`); `encode` is here for cross-checks.

mod bpe;
mod split;

use std::time::Instant;

use ahash::AHashMap;
use compact_str::CompactString;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyDict, PyString};
use rayon::prelude::*;

use bpe::{Pair, Word};
use split::{Splitter, GPT4_PATTERN};

/// Where the time of the last training went, for benchmarks.
#[derive(Default, Clone)]
struct TrainStats {
    docs: u64,
    bytes: u64,
    unique_chunks: usize,
    merges: usize,
    iterator_s: f64, // waiting for the Python iterator (reading, decoding, user code)
    split_count_s: f64, // regex splitting and chunk counting, GIL released
    merge_s: f64,    // building words and pair counts, then learning the merges
}

#[pyclass(module = "jaxchat.rustbpe")]
struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<Pair>,
    merge_ids: AHashMap<Pair, u32>,
    stats: TrainStats,
}

/// Logs through Python's `logging` (logger "jaxchat.rustbpe"); a failure to log is ignored.
fn log_info(msg: &str) {
    Python::with_gil(|py| {
        let _ = py
            .import("logging")
            .and_then(|m| m.call_method1("getLogger", ("jaxchat.rustbpe",)))
            .and_then(|logger| logger.call_method1("info", (msg,)));
    });
}

type ChunkCounts<'a> = AHashMap<&'a str, i64>;

/// Splits the documents in parallel; each rayon task counts into its own map, borrowing the
/// chunks from the documents, so nothing is allocated per chunk.
fn count_chunks<'a>(
    splitter: &Splitter,
    docs: &'a [PyBackedStr],
) -> Result<ChunkCounts<'a>, String> {
    docs.par_iter()
        .try_fold(ChunkCounts::new, |mut counts, doc| {
            splitter.for_each_chunk(doc, |chunk| *counts.entry(chunk).or_default() += 1)?;
            Ok(counts)
        })
        .try_reduce(ChunkCounts::new, |a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (chunk, c) in small {
                *big.entry(chunk).or_default() += c;
            }
            Ok(big)
        })
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer {
            pattern: GPT4_PATTERN.to_string(),
            splitter: Splitter::new(GPT4_PATTERN).expect("built-in pattern compiles"),
            merges: Vec::new(),
            merge_ids: AHashMap::new(),
            stats: TrainStats::default(),
        }
    }

    /// Trains on the strings of `iterator` until it is exhausted, up to `vocab_size` tokens
    /// (256 bytes + merges). Replaces any earlier training.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256, got {vocab_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let splitter = Splitter::new(&pattern)
            .map_err(|e| PyValueError::new_err(format!("invalid pattern: {e}")))?;
        let mut stats = TrainStats::default();

        // 1. Ingest: pull a batch under the GIL, then split and count it without the GIL.
        let mut chunk_counts: AHashMap<CompactString, i64> = AHashMap::new();
        let mut iter = iterator.try_iter()?;
        let mut buffer: Vec<PyBackedStr> = Vec::with_capacity(buffer_size.clamp(1, 1 << 16));
        loop {
            let t0 = Instant::now();
            buffer.clear();
            let mut exhausted = false;
            while buffer.len() < buffer_size.max(1) {
                let Some(item) = iter.next() else {
                    exhausted = true;
                    break;
                };
                let item = item?;
                let text = item.downcast_into::<PyString>().map_err(|e| {
                    let type_name = e
                        .into_inner()
                        .get_type()
                        .name()
                        .map_or("?".into(), |n| n.to_string());
                    PyTypeError::new_err(format!(
                        "train_from_iterator expects str items, got {type_name}"
                    ))
                })?;
                let text = PyBackedStr::try_from(text)?;
                stats.bytes += text.len() as u64;
                buffer.push(text);
            }
            stats.docs += buffer.len() as u64;
            let t1 = Instant::now();
            stats.iterator_s += (t1 - t0).as_secs_f64();
            py.allow_threads(|| -> Result<(), String> {
                for (chunk, c) in count_chunks(&splitter, &buffer)? {
                    match chunk_counts.get_mut(chunk) {
                        Some(total) => *total += c,
                        None => {
                            chunk_counts.insert(CompactString::from(chunk), c);
                        }
                    }
                }
                Ok(())
            })
            .map_err(PyRuntimeError::new_err)?;
            stats.split_count_s += t1.elapsed().as_secs_f64();
            if exhausted {
                break;
            }
        }
        drop(buffer);
        stats.unique_chunks = chunk_counts.len();

        // 2. Learn the merges, GIL released; log about every 10%.
        let num_merges = (vocab_size - 256) as usize;
        let t0 = Instant::now();
        let merges = py.allow_threads(|| {
            let (words, counts): (Vec<Word>, Vec<i64>) = chunk_counts
                .into_iter()
                .map(|(chunk, c)| (Word::from_bytes(chunk.as_bytes()), c))
                .unzip();
            log_info(&format!(
                "rustbpe: {} docs, {} MB, {} unique chunks; learning {num_merges} merges",
                stats.docs,
                stats.bytes / 1_000_000,
                words.len()
            ));
            let every = (num_merges / 10).max(1);
            bpe::train(words, &counts, num_merges, |step, pair, count| {
                if step % every == 0 || step == num_merges {
                    log_info(&format!(
                        "rustbpe: merge {step}/{num_merges}: {pair:?} -> {} (count {count})",
                        255 + step
                    ));
                }
            })
        });
        stats.merge_s = t0.elapsed().as_secs_f64();
        stats.merges = merges.len();

        self.merge_ids = merges
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, 256 + i as u32))
            .collect();
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
        self.stats = stats;
        Ok(())
    }

    fn get_pattern(&self) -> &str {
        &self.pattern
    }

    /// The pair of token ids merged at each step; step i created token 256 + i.
    fn get_merges(&self) -> Vec<Pair> {
        self.merges.clone()
    }

    /// (token bytes, rank) for the 256 bytes and then every merge, ranks ascending: the
    /// `mergeable_ranks` of a tiktoken Encoding.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &self.merges {
            let joined = [
                token_bytes[a as usize].as_slice(),
                token_bytes[b as usize].as_slice(),
            ]
            .concat();
            token_bytes.push(joined);
        }
        token_bytes
            .iter()
            .enumerate()
            .map(|(rank, bytes)| (PyBytes::new(py, bytes), rank as u32))
            .collect()
    }

    /// Splits `text` with the pattern and encodes each chunk by applying merges in order.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| self.encode_text(text))
            .map_err(PyRuntimeError::new_err)
    }

    /// `encode` over many texts, in parallel.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<PyBackedStr>) -> PyResult<Vec<Vec<u32>>> {
        py.allow_threads(|| {
            texts
                .par_iter()
                .map(|t| self.encode_text(t))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(PyRuntimeError::new_err)
    }

    /// Timing and sizes of the last `train_from_iterator`, as a dict.
    fn last_train_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.stats;
        let d = PyDict::new(py);
        d.set_item("docs", s.docs)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("unique_chunks", s.unique_chunks)?;
        d.set_item("merges", s.merges)?;
        d.set_item("iterator_s", s.iterator_s)?;
        d.set_item("split_count_s", s.split_count_s)?;
        d.set_item("merge_s", s.merge_s)?;
        Ok(d)
    }
}

impl Tokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        self.splitter.for_each_chunk(text, |chunk| {
            ids.extend(bpe::encode_chunk(chunk.as_bytes(), &self.merge_ids))
        })?;
        Ok(ids)
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add_class::<Tokenizer>()?;
    Ok(())
}
