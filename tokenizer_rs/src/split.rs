//! Pre-tokenization: cutting text into chunks with the split pattern.
//!
//! Any pattern works through `fancy-regex` (the engine tiktoken uses, so encodings agree).
//! The GPT-4 style pattern (nanochat's `\p{N}{1,2}` or GPT-4's `\p{N}{1,3}`) is so common that
//! it also has a hand-written splitter, several times faster. It is exact by construction of
//! its character classes (the very `\p{L}`, `\p{N}`, `\s` tables of regex-syntax, which
//! fancy-regex uses) and by the tests below, which compare it with the regex on tricky text.

use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

/// nanochat's split pattern: GPT-4's (cl100k) with numbers in groups of at most two digits.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub enum Splitter {
    /// The GPT-4 style pattern, with numbers split into runs of at most `max_digits`.
    Gpt4 {
        max_digits: usize,
    },
    Regex(Box<Regex>),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == GPT4_PATTERN {
            return Ok(Splitter::Gpt4 { max_digits: 2 });
        }
        if pattern == GPT4_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}") {
            return Ok(Splitter::Gpt4 { max_digits: 3 });
        }
        Regex::new(pattern)
            .map(|re| Splitter::Regex(Box::new(re)))
            .map_err(|e| e.to_string())
    }

    /// Calls `f` on each chunk of `text`, in order.
    pub fn for_each_chunk<'a>(
        &self,
        text: &'a str,
        mut f: impl FnMut(&'a str),
    ) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => {
                let mut start = 0;
                while start < text.len() {
                    let end = gpt4_chunk_end(text, start, *max_digits);
                    f(&text[start..end]);
                    start = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    f(m.map_err(|e| format!("regex error while splitting: {e}"))?
                        .as_str());
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cls {
    Letter,  // \p{L}
    Number,  // \p{N}
    Newline, // \r or \n
    Space,   // any other \s
    Other,
}

/// (first, last, class) code point ranges, sorted; code points not covered are `Other`.
fn ranges() -> &'static [(u32, u32, Cls)] {
    static RANGES: OnceLock<Vec<(u32, u32, Cls)>> = OnceLock::new();
    RANGES.get_or_init(|| {
        let mut out = Vec::new();
        for (re, cls) in [
            (r"\p{L}", Cls::Letter),
            (r"\p{N}", Cls::Number),
            (r"\s", Cls::Space),
        ] {
            let hir = regex_syntax::parse(re).expect("valid class");
            let HirKind::Class(Class::Unicode(set)) = hir.kind() else {
                unreachable!("{re} is a Unicode class")
            };
            out.extend(
                set.ranges()
                    .iter()
                    .map(|r| (r.start() as u32, r.end() as u32, cls)),
            );
        }
        // \r and \n get their own class; as single code points they sit in \s ranges of their own
        // or at the edge of one (9..=13), so split that range.
        let mut split = Vec::new();
        for (lo, hi, cls) in out {
            let mut lo = lo;
            for nl in ['\n' as u32, '\r' as u32] {
                if cls == Cls::Space && lo <= nl && nl <= hi {
                    if lo < nl {
                        split.push((lo, nl - 1, cls));
                    }
                    split.push((nl, nl, Cls::Newline));
                    lo = nl + 1;
                }
            }
            if lo <= hi {
                split.push((lo, hi, cls));
            }
        }
        split.sort_unstable_by_key(|r| r.0);
        split
    })
}

fn classify(c: char) -> Cls {
    static ASCII: OnceLock<[Cls; 128]> = OnceLock::new();
    let c = c as u32;
    if c < 128 {
        let table = ASCII.get_or_init(|| std::array::from_fn(|i| classify_slow(i as u32)));
        return table[c as usize];
    }
    classify_slow(c)
}

fn classify_slow(c: u32) -> Cls {
    let r = ranges();
    let i = r.partition_point(|&(lo, _, _)| lo <= c);
    match i.checked_sub(1).map(|i| r[i]) {
        Some((_, hi, cls)) if c <= hi => cls,
        _ => Cls::Other,
    }
}

/// The char starting at byte `i` and the byte just after it (None at the end).
#[inline]
fn peek(s: &str, i: usize) -> Option<(char, usize)> {
    s[i..].chars().next().map(|c| (c, i + c.len_utf8()))
}

/// Byte offset after the run of chars satisfying `pred` that starts at `i`.
#[inline]
fn skip(s: &str, i: usize, pred: impl Fn(char) -> bool) -> usize {
    s[i..].find(|c: char| !pred(c)).map_or(s.len(), |n| i + n)
}

/// End of the leftmost-first match of the GPT-4 pattern at byte `start` (< s.len()).
/// Each block below is one alternative of the pattern, tried in the pattern's order.
fn gpt4_chunk_end(s: &str, start: usize, max_digits: usize) -> usize {
    let (c0, p1) = peek(s, start).expect("start < len");
    let k0 = classify(c0);
    let next = peek(s, p1).map(|(c, e)| (c, classify(c), e));
    let is = |k: Cls| next.is_some_and(|(_, k1, _)| k1 == k);

    // '(?i:[sdmt]|ll|ve|re)  (case-insensitive in Unicode: 's' also matches U+017F 'ſ')
    if c0 == '\'' {
        if let Some((c1, _, p2)) = next {
            let c1 = c1.to_ascii_lowercase();
            if matches!(c1, 's' | 'd' | 'm' | 't' | 'ſ') {
                return p2;
            }
            if let Some((c2, p3)) = peek(s, p2) {
                if matches!(
                    (c1, c2.to_ascii_lowercase()),
                    ('l', 'l') | ('v', 'e') | ('r', 'e')
                ) {
                    return p3;
                }
            }
        }
    }
    let is_letter = |c: char| classify(c) == Cls::Letter;
    // [^\r\n\p{L}\p{N}]?+\p{L}+
    if k0 == Cls::Letter {
        return skip(s, p1, is_letter);
    }
    if k0 != Cls::Newline && k0 != Cls::Number && is(Cls::Letter) {
        return skip(s, next.unwrap().2, is_letter);
    }
    // \p{N}{1,max_digits}
    if k0 == Cls::Number {
        let mut end = p1;
        for _ in 1..max_digits {
            match peek(s, end) {
                Some((c, e)) if classify(c) == Cls::Number => end = e,
                _ => break,
            }
        }
        return end;
    }
    // ' ?[^\s\p{L}\p{N}]++[\r\n]*'
    let punct_start = match k0 {
        Cls::Other => Some(p1),
        _ if c0 == ' ' && is(Cls::Other) => Some(next.unwrap().2),
        _ => None,
    };
    if let Some(p) = punct_start {
        let end = skip(s, p, |c| classify(c) == Cls::Other);
        return skip(s, end, |c| c == '\r' || c == '\n');
    }
    // Only whitespace is left: c0 is in \s. Take the maximal run.
    let run_end = skip(s, start, |c| {
        matches!(classify(c), Cls::Space | Cls::Newline)
    });
    let run = &s[start..run_end];
    // \s*[\r\n]: through the last newline of the run.
    if let Some(i) = run.rfind(['\r', '\n']) {
        return start + i + 1;
    }
    // \s+(?!\S): the whole run at the end of text, else all but its last char
    // (a single char before non-space fails here and falls to \s+: the whole run).
    if run_end == s.len() {
        return run_end;
    }
    let last = run.char_indices().next_back().expect("non-empty run").0;
    if last > 0 {
        start + last
    } else {
        run_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(sp: &Splitter, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        sp.for_each_chunk(text, |c| out.push(c.to_string()))
            .unwrap();
        out
    }

    /// A tiny deterministic generator (xorshift) so the test needs no crates.
    fn fuzz_text(seed: u64, n: usize) -> String {
        #[rustfmt::skip]
        const POOL: &[&str] = &[
            " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\u{a0}", "\u{2028}", "\u{85}", "\u{b}", "\u{c}", "\u{3000}",
            "a", "Z", "é", "e\u{301}", "ß", "ſ", "K", "Ж", "ا", "中", "語", "ー", "\u{1F600}", "\u{1F44D}\u{1F3FD}",
            "0", "7", "²", "٣", "Ⅻ", "½", "'", "'s", "'S", "'ll", "'LL", "'Ve", "'re", "'d", "'m", "'t", "'x", "’",
            ".", ",", "!?", "(", ")", "{", "}", "#", "_", "-", "\"", "$", "\u{200b}", "\u{feff}", "\u{301}",
            "hello", "World", "don't", "3.14", "2024-01-02", "x=1;", "def f():", "ca", "Ñu",
        ];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut s = String::new();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(POOL[(x % POOL.len() as u64) as usize]);
        }
        s
    }

    #[test]
    fn fast_splitter_matches_regex() {
        for (fast_pat, max_digits) in [
            (GPT4_PATTERN.to_string(), 2),
            (GPT4_PATTERN.replace("{1,2}", "{1,3}"), 3),
        ] {
            let fast = Splitter::new(&fast_pat).unwrap();
            assert!(matches!(fast, Splitter::Gpt4 { max_digits: d } if d == max_digits));
            let slow = Splitter::Regex(Box::new(Regex::new(&fast_pat).unwrap()));
            for seed in 0..3000 {
                let text = fuzz_text(seed, 1 + (seed as usize % 80));
                assert_eq!(chunks(&fast, &text), chunks(&slow, &text), "text {text:?}");
            }
        }
    }

    #[test]
    fn fast_splitter_matches_regex_across_unicode() {
        // Every code point below U+3000 and a sample above, in places where its class matters.
        let fast = Splitter::new(GPT4_PATTERN).unwrap();
        let slow = Splitter::Regex(Box::new(Regex::new(GPT4_PATTERN).unwrap()));
        let points: Vec<char> = (0..0x3000)
            .chain((0x3000..0x11_0000).step_by(13))
            .filter_map(char::from_u32)
            .collect();
        for group in points.chunks(128) {
            let text: String = group
                .iter()
                .map(|c| format!("{c}{c}a'{c} {c}1{c}  {c}\n"))
                .collect();
            assert_eq!(chunks(&fast, &text), chunks(&slow, &text), "text {text:?}");
        }
    }

    #[test]
    fn classes_cover_each_code_point_once() {
        let r = ranges();
        assert!(r.windows(2).all(|w| w[0].1 < w[1].0), "ranges overlap");
        assert_eq!(classify('\n'), Cls::Newline);
        assert_eq!(classify('\r'), Cls::Newline);
        assert_eq!(classify('\t'), Cls::Space);
        assert_eq!(classify('\u{85}'), Cls::Space);
        assert_eq!(classify('中'), Cls::Letter);
        assert_eq!(classify('²'), Cls::Number);
        assert_eq!(classify('\u{301}'), Cls::Other);
    }

    #[test]
    fn known_splits() {
        let sp = Splitter::new(GPT4_PATTERN).unwrap();
        assert_eq!(chunks(&sp, "Hello world"), ["Hello", " world"]);
        assert_eq!(
            chunks(&sp, "I'm 12345 ok!!\n\n  x  "),
            ["I", "'m", " ", "12", "34", "5", " ok", "!!\n\n", " ", " x", "  "]
        );
        assert_eq!(chunks(&sp, "a   b"), ["a", "  ", " b"]);
    }

    #[test]
    fn bad_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }
}
