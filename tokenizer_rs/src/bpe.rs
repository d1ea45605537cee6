//! Byte-level BPE: the incremental trainer and a simple encoder.
//!
//! Training keeps, for every adjacent pair of token ids, its count over all words (weighted by
//! the word's count, overlapping occurrences counted) and the list of words it may occur in.
//! Merging a pair only touches those words, and each word reports how its neighbour pairs
//! changed, so nothing is ever recounted from scratch.

use std::cmp::Ordering;

use ahash::AHashMap;
use dary_heap::OctonaryHeap;
use rayon::prelude::*;

pub type Pair = (u32, u32);

/// One unique chunk of the training text, as token ids (bytes at first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Word(pub Vec<u32>);

impl Word {
    pub fn from_bytes(bytes: &[u8]) -> Word {
        Word(bytes.iter().map(|&b| u32::from(b)).collect())
    }

    pub fn pairs(&self) -> impl Iterator<Item = Pair> + '_ {
        self.0.windows(2).map(|w| (w[0], w[1]))
    }

    /// Replaces the non-overlapping occurrences of `pair`, left to right, with `new_id`, and
    /// calls `delta(p, ±1)` for every change to the word's adjacent pairs (the merged pair
    /// itself included), so that the caller can keep global pair counts exact.
    pub fn merge_pair(&mut self, pair: Pair, new_id: u32, mut delta: impl FnMut(Pair, i64)) {
        let (a, b) = pair;
        let ids = &mut self.0;
        let n = ids.len();
        let (mut read, mut write) = (0, 0);
        // In place: `write` never passes `read`, and ids[..write] is the merged prefix, so the
        // left neighbour of a match is ids[write - 1] (possibly a `new_id` just written).
        while read < n {
            if read + 1 < n && ids[read] == a && ids[read + 1] == b {
                if write > 0 {
                    let prev = ids[write - 1];
                    delta((prev, a), -1);
                    delta((prev, new_id), 1);
                }
                delta(pair, -1);
                if read + 2 < n {
                    let next = ids[read + 2];
                    delta((b, next), -1);
                    delta((new_id, next), 1);
                }
                ids[write] = new_id;
                read += 2;
            } else {
                ids[write] = ids[read];
                read += 1;
            }
            write += 1;
        }
        ids.truncate(write);
    }
}

/// A candidate merge in the heap: highest count first, ties to the smallest pair.
#[derive(PartialEq, Eq)]
struct Job {
    count: i64,
    pair: Pair,
}

impl Ord for Job {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

type PairCounts = AHashMap<Pair, i64>;
type PairWords = AHashMap<Pair, Vec<u32>>;

/// Pair counts and, per pair, the words holding it (each word listed once), in parallel.
fn count_pairs(words: &[Word], counts: &[i64]) -> (PairCounts, PairWords) {
    words
        .par_iter()
        .zip(counts)
        .enumerate()
        .with_min_len(1024)
        .fold(
            || (PairCounts::new(), PairWords::new()),
            |(mut pc, mut pw), (i, (word, &count))| {
                for p in word.pairs() {
                    *pc.entry(p).or_default() += count;
                    let list = pw.entry(p).or_default();
                    // A word's pushes are consecutive, so checking the last entry dedups.
                    if list.last() != Some(&(i as u32)) {
                        list.push(i as u32);
                    }
                }
                (pc, pw)
            },
        )
        .reduce(
            || (PairCounts::new(), PairWords::new()),
            |(mut pc, mut pw), (pc2, pw2)| {
                for (p, c) in pc2 {
                    *pc.entry(p).or_default() += c;
                }
                for (p, list) in pw2 {
                    pw.entry(p).or_default().extend(list);
                }
                (pc, pw)
            },
        )
}

/// Learns up to `num_merges` merges from unique `words` with their `counts`; returns the pair
/// merged at each step (step i creates token 256 + i). Stops early when no pair is left.
/// `progress(step, pair, count)` is called after each merge.
pub fn train(
    mut words: Vec<Word>,
    counts: &[i64],
    num_merges: usize,
    mut progress: impl FnMut(usize, Pair, i64),
) -> Vec<Pair> {
    let (mut pair_counts, mut pair_words) = count_pairs(&words, counts);
    let mut heap: OctonaryHeap<Job> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&pair, &count)| Job { count, pair })
        .collect();

    let mut merges = Vec::with_capacity(num_merges);
    let mut new_pairs = Vec::new();
    while merges.len() < num_merges {
        let Some(job) = heap.pop() else { break };
        // Counts only ever drop after a job is pushed (a pair gains occurrences only in the
        // step that creates its newest token), so a stale job is an upper bound: refresh it.
        let current = pair_counts.get(&job.pair).copied().unwrap_or(0);
        if current != job.count {
            if current > 0 {
                heap.push(Job {
                    count: current,
                    pair: job.pair,
                });
            }
            continue;
        }
        let pair = job.pair;
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        // The list may name words that lost the pair since; merging there is a no-op.
        for wi in pair_words.remove(&pair).unwrap_or_default() {
            let count = counts[wi as usize];
            words[wi as usize].merge_pair(pair, new_id, |p, d| {
                let c = pair_counts.entry(p).or_default();
                *c += d * count;
                if *c == 0 {
                    // Gone from every word for good: forget its word list too (saves memory).
                    pair_counts.remove(&p);
                    pair_words.remove(&p);
                }
                if d > 0 {
                    // Only pairs holding `new_id` gain, and they are all new in this step.
                    let list = pair_words.entry(p).or_insert_with(|| {
                        new_pairs.push(p);
                        Vec::new()
                    });
                    if list.last() != Some(&wi) {
                        list.push(wi);
                    }
                }
            });
        }
        for p in new_pairs.drain(..) {
            if let Some(&count) = pair_counts.get(&p) {
                heap.push(Job { count, pair: p });
            }
        }
        progress(merges.len(), pair, job.count);
    }
    merges
}

/// Encodes one chunk: repeatedly merges the adjacent pair with the lowest merge id (minbpe's
/// rule; equals tiktoken's when tokens have distinct bytes).
pub fn encode_chunk(bytes: &[u8], merge_ids: &AHashMap<Pair, u32>) -> Vec<u32> {
    let mut word = Word::from_bytes(bytes);
    while let Some((new_id, pair)) = word
        .pairs()
        .filter_map(|p| merge_ids.get(&p).map(|&id| (id, p)))
        .min()
    {
        word.merge_pair(pair, new_id, |_, _| {});
    }
    word.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair_counts(ids: &[u32]) -> AHashMap<Pair, i64> {
        let mut m = AHashMap::new();
        for w in ids.windows(2) {
            *m.entry((w[0], w[1])).or_default() += 1;
        }
        m
    }

    /// The deltas must turn the pair counts before the merge into those after it.
    fn check_merge(before: &[u32], pair: Pair, after: &[u32]) {
        let mut word = Word(before.to_vec());
        let mut counts = pair_counts(before);
        word.merge_pair(pair, 99, |p, d| *counts.entry(p).or_default() += d);
        assert_eq!(word.0, after);
        counts.retain(|_, c| *c != 0);
        assert_eq!(counts, pair_counts(after), "{before:?} merging {pair:?}");
    }

    #[test]
    fn merge_pair_deltas() {
        check_merge(&[1, 2, 3], (1, 2), &[99, 3]);
        check_merge(&[3, 1, 2], (1, 2), &[3, 99]);
        check_merge(&[1, 2, 1, 2], (1, 2), &[99, 99]);
        check_merge(&[5, 1, 2, 1, 2, 6], (1, 2), &[5, 99, 99, 6]);
        check_merge(&[1, 1, 1], (1, 1), &[99, 1]);
        check_merge(&[1, 1, 1, 1], (1, 1), &[99, 99]);
        check_merge(&[2, 1, 1, 1, 1, 1, 2], (1, 1), &[2, 99, 99, 1, 2]);
        check_merge(&[1, 3, 2], (1, 2), &[1, 3, 2]);
        check_merge(&[7], (1, 2), &[7]);
    }

    #[test]
    fn train_small_corpus() {
        // "aaab" x2, "ab" x3: (a,b) 5 beats (a,a) 4; then (a,256) 2 ties (a,a) 2 -> smaller pair.
        let words = vec![Word::from_bytes(b"aaab"), Word::from_bytes(b"ab")];
        let merges = train(words, &[2, 3], 10, |_, _, _| {});
        let (a, b) = (u32::from(b'a'), u32::from(b'b'));
        assert_eq!(merges, vec![(a, b), (a, a), (257, 256)]);
    }

    #[test]
    fn encode_uses_lowest_merge_first() {
        let (a, b, c) = (u32::from(b'a'), u32::from(b'b'), u32::from(b'c'));
        let merge_ids: AHashMap<Pair, u32> = [((b, c), 256), ((a, b), 257)].into_iter().collect();
        assert_eq!(encode_chunk(b"abc", &merge_ids), vec![a, 256]);
        assert_eq!(encode_chunk(b"abab", &merge_ids), vec![257, 257]);
    }
}
