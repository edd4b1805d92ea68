//! A request frame's top-level members, each kept as the JSON text it was
//! sent as, so that the protocol checks each one's type itself and nothing
//! is built that the op does not need.
//!
//! [`Members::scan`] reads an ordinary frame in one pass: it finds each
//! member's extent and checks the JSON grammar on the way, jumping through
//! long strings (a submit's input is mostly strings) with `memchr`. It declines
//! what it does not read, and the protocol then reads the frame with
//! serde_json (the same struct, derived), which also words the error: text that is not JSON, a key
//! written with escapes, a member the protocol knows given twice, nesting
//! past the limit. So both readers agree on every frame the scan accepts;
//! the tests check that on generated and mangled frames.

use serde::Deserialize;
use serde_json::value::RawValue;

/// The members of a request; each present one as its raw JSON text
/// (`null` included).
#[derive(Deserialize, Default, Debug, PartialEq, Eq)]
pub struct Members<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    pub op: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub id: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub input: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present", rename = "fn")]
    pub fn_name: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub wait: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub key: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub interval_ms: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub concurrency: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub task: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub output: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub error: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub max_age_ms: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub priority: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub deadline_ms: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub progress: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    pub data: Option<&'a str>,
}

/// A member that is there, `null` included (plain `Option` would read
/// `null` as absent).
fn present<'de, D>(d: D) -> Result<Option<&'de str>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(d).map(|raw| Some(raw.get()))
}

impl<'a> Members<'a> {
    /// The members of `text` when it is a JSON object nested at most
    /// `max_depth` deep whose keys have no escapes and whose known members
    /// each appear once; otherwise `None`.
    pub fn scan(text: &'a str, max_depth: usize) -> Option<Self> {
        Self::scan_knowing(text, max_depth, |_, _| false)
    }

    /// As [`Members::scan`], except for a frame whose last member is
    /// `input`: its text, with the members before it, is offered to
    /// `known` first, and if `known` vouches for it (it is a value read
    /// before, so valid JSON nested within the limit), it is taken without
    /// being read again. A repeated submit is mostly its input, so this
    /// skips most of its bytes.
    pub fn scan_knowing(
        text: &'a str,
        max_depth: usize,
        mut known: impl FnMut(&Self, &'a str) -> bool,
    ) -> Option<Self> {
        let mut members = Members::default();
        let mut at = Cursor {
            text: text.as_bytes(),
            pos: 0,
        };
        at.skip_ws();
        if at.peek()? != b'{' {
            return None;
        }
        at.nested(max_depth, b'}', |at, depth| {
            let (name, escapes) = at.name()?;
            if escapes {
                return None;
            }
            let start = at.pos;
            if name == b"input" && members.input.is_none() {
                if let Some((end, close)) = last_value(text, start) {
                    if known(&members, &text[start..end]) {
                        members.input = Some(&text[start..end]);
                        at.pos = close;
                        return Some(());
                    }
                }
            }
            at.value(depth)?;
            let twice = members
                .slot(name)
                .is_some_and(|slot| slot.replace(&text[start..at.pos]).is_some());
            (!twice).then_some(())
        })?;
        at.skip_ws();
        (at.pos == text.len()).then_some(members)
    }

    fn slot(&mut self, name: &[u8]) -> Option<&mut Option<&'a str>> {
        Some(match name {
            b"op" => &mut self.op,
            b"id" => &mut self.id,
            b"input" => &mut self.input,
            b"fn" => &mut self.fn_name,
            b"wait" => &mut self.wait,
            b"key" => &mut self.key,
            b"interval_ms" => &mut self.interval_ms,
            b"concurrency" => &mut self.concurrency,
            b"task" => &mut self.task,
            b"output" => &mut self.output,
            b"error" => &mut self.error,
            b"max_age_ms" => &mut self.max_age_ms,
            b"priority" => &mut self.priority,
            b"deadline_ms" => &mut self.deadline_ms,
            b"progress" => &mut self.progress,
            b"data" => &mut self.data,
            _ => return None,
        })
    }
}

/// A position in a frame's bytes; every step returns `None` at anything
/// that is not the JSON it expects.
struct Cursor<'t> {
    text: &'t [u8],
    pos: usize,
}

impl<'t> Cursor<'t> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.eat_if(byte).then_some(())
    }

    fn eat_if(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.pos += usize::from(found);
        found
    }

    fn eat_word(&mut self, word: &[u8]) -> Option<()> {
        let found = self.text.get(self.pos..)?.starts_with(word);
        self.pos += word.len() * usize::from(found);
        found.then_some(())
    }

    /// A member's name and its colon: the name as written between the
    /// quotes, and whether that has escapes. The cursor stops where the
    /// value starts.
    fn name(&mut self) -> Option<(&'t [u8], bool)> {
        let name_start = self.pos + 1;
        let escapes = self.string()?;
        let name = &self.text[name_start..self.pos - 1];
        self.skip_ws();
        self.eat(b':')?;
        self.skip_ws();
        Some((name, escapes))
    }

    /// Any JSON value, with at most `depth` more levels of arrays and
    /// objects.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.nested(depth, b'}', |at, depth| {
                at.name()?;
                at.value(depth)
            }),
            b'[' => self.nested(depth, b']', Self::value),
            b't' => self.eat_word(b"true"),
            b'f' => self.eat_word(b"false"),
            b'n' => self.eat_word(b"null"),
            _ => self.number(),
        }
    }

    /// An array or object (at its opening bracket) of items read by `item`,
    /// separated by commas, up to `close`.
    fn nested(
        &mut self,
        depth: usize,
        close: u8,
        mut item: impl FnMut(&mut Self, usize) -> Option<()>,
    ) -> Option<()> {
        let depth = depth.checked_sub(1)?;
        self.pos += 1;
        self.skip_ws();
        if self.eat_if(close) {
            return Some(());
        }
        loop {
            item(self, depth)?;
            self.skip_ws();
            if self.eat_if(close) {
                return Some(());
            }
            self.eat(b',')?;
            self.skip_ws();
        }
    }

    /// A string (at its opening quote); whether it had escapes.
    fn string(&mut self) -> Option<bool> {
        self.eat(b'"')?;
        let mut escapes = false;
        loop {
            let rest = &self.text[self.pos..];
            let stop = plain_run(rest)?;
            self.pos += stop + 1;
            if rest[stop] == b'"' {
                return Some(escapes);
            }
            escapes = true;
            match self.peek()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.pos += 1,
                b'u' => {
                    let hex = self.text.get(self.pos + 1..self.pos + 5)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.pos += 5;
                }
                _ => return None,
            }
        }
    }

    /// A number: `-`, an integer part without leading zeros, then an
    /// optional fraction and exponent.
    fn number(&mut self) -> Option<()> {
        self.eat_if(b'-');
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat_if(b'.') {
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }
}

/// Where a value starting at `start` ends if it is the frame's last:
/// the end of its text and where the frame's closing brace is, with only
/// whitespace around them; `None` if nothing is there.
fn last_value(text: &str, start: usize) -> Option<(usize, usize)> {
    const WS: &[char] = &[' ', '\n', '\r', '\t'];
    let close = text.trim_end_matches(WS).strip_suffix('}')?.len();
    let end = text[..close].trim_end_matches(WS).len();
    (end > start).then_some((end, close))
}

/// The length of the run of plain string bytes that `bytes` starts with,
/// up to a `"` or `\\`; `None` if a control character (not allowed in a
/// string) or the end comes first. The first bytes are read one by one
/// (most strings in a request are short, and end there), the rest with
/// `memchr`.
fn plain_run(bytes: &[u8]) -> Option<usize> {
    const BYTEWISE: usize = 16;
    for (at, &b) in bytes.iter().take(BYTEWISE).enumerate() {
        match b {
            b'"' | b'\\' => return Some(at),
            0..=0x1f => return None,
            _ => {}
        }
    }
    let from = BYTEWISE.min(bytes.len());
    let at = from + memchr::memchr2(b'"', b'\\', &bytes[from..])?;
    // The least byte rather than `any`, which stops early and so cannot
    // be vectorized.
    (bytes[from..at].iter().copied().min().unwrap_or(b' ') >= b' ').then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The limit the protocol reads frames with.
    const DEPTH: usize = 129;

    fn by_serde(text: &str) -> Option<Members<'_>> {
        serde_json::from_str(text).ok()
    }

    #[test]
    fn reads_what_serde_json_reads() {
        for text in [
            r#"{"op":"submit","id":7,"fn":"sleep","input":{"prompt":"xx","n":[1,2.5e3,-0.1]}}"#,
            r#" { "op" : "ping" , "id" : "a\"b\u00e9" , "extra" : [ { } , [ ] , null ] } "#,
            r#"{"op":"get","key":null,"wait":false,"unknown":{"op":1}}"#,
            r#"{}"#,
            "{\"op\":\"submit\",\"input\":\"caf\u{e9} \\/\\b\\f\\n\\r\\t\\u12aF\"}",
            r#"{"op":"a long string, past the bytes read one by one\n and \" on"}"#,
        ] {
            let scanned = Members::scan(text, DEPTH);
            assert!(scanned.is_some(), "scans {text}");
            assert_eq!(scanned, by_serde(text), "{text}");
        }
    }

    #[test]
    fn declines_what_it_does_not_read() {
        for text in [
            "",
            "[1]",
            r#"{"op":"ping",}"#,
            r#"{"op":"ping"} x"#,
            r#"{"op":"ping","op":"get"}"#,
            r#"{"o\u0070":"ping"}"#,
            r#"{"op":"a	b"}"#,
            r#"{"op":"\x"}"#,
            r#"{"op":"\u12g4"}"#,
            r#"{"n":01}"#,
            r#"{"n":1.}"#,
            r#"{"n":-}"#,
            r#"{"n":1e}"#,
            r#"{"n":tru}"#,
            r#"{"n":[1 2]}"#,
            r#"{"n":{"a" 1}}"#,
            r#"{"n":{1:1}}"#,
            r#"{"op":"ping""#,
            "{\"op\":\"a\u{1f}\"}",
            "{\"op\":\"a long string, past the bytes read one by one\u{1}\"}",
            "{\"op\":\"a long string, past the bytes read one by one\\n\u{0}\"}",
            r#"{"op":"a long string, past the bytes read one by one"#,
        ] {
            assert_eq!(Members::scan(text, DEPTH), None, "declines {text}");
        }
    }

    #[test]
    fn a_run_ends_at_its_first_quote_backslash_or_control_byte() {
        let naive = |bytes: &[u8]| {
            let at = bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < b' ')?;
            (bytes[at] >= b' ').then_some(at)
        };
        for len in 0..100 {
            for end in [b'"', b'\\', 0x1f, 0x00] {
                for at in 0..=len {
                    let mut bytes = vec![b'x'; len];
                    if at < len {
                        bytes[at] = end;
                    }
                    bytes.extend_from_slice(b"\"tail");
                    assert_eq!(plain_run(&bytes), naive(&bytes), "{len} {at} {end}");
                }
            }
            assert_eq!(plain_run(&vec![b'x'; len]), None, "no end in {len}");
        }
    }

    #[test]
    fn nesting_is_bounded_as_serde_json_bounds_it() {
        let nested = |levels: usize| {
            format!(
                r#"{{"op":"submit","input":{}1{}}}"#,
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        let deepest = nested(DEPTH - 1);
        assert_eq!(Members::scan(&deepest, DEPTH), by_serde(&deepest));
        assert!(Members::scan(&deepest, DEPTH).is_some());
        assert_eq!(Members::scan(&nested(DEPTH), DEPTH), None);
    }

    /// A caller that vouches only for what is a JSON value (all the
    /// generated ones are nested well within the limit).
    fn honest(_: &Members, input: &str) -> bool {
        serde_json::from_str::<&RawValue>(input).is_ok()
    }

    #[test]
    fn offers_the_text_from_input_to_the_closing_brace_and_takes_it_if_vouched_for() {
        let text = "{\"op\":\"submit\",\"fn\":\"f\",\"input\": [1, {\"a\":2}] \n}\n ";
        let mut offered = vec![];
        let scanned = Members::scan_knowing(text, DEPTH, |before, input| {
            offered.push((before.fn_name, input));
            true
        });
        assert_eq!(offered, [(Some("\"f\""), "[1, {\"a\":2}]")]);
        assert_eq!(scanned, by_serde(text));
        // Nothing after the name but whitespace and the brace: no value,
        // nothing offered.
        let mut asked = false;
        for text in [r#"{"op":"x","input":}"#, r#"{"op":"x","input": }"#] {
            let none = Members::scan_knowing(text, DEPTH, |_, _| {
                asked = true;
                true
            });
            assert_eq!((none, asked), (None, false), "{text}");
        }
    }

    #[test]
    fn takes_a_vouched_input_without_reading_it() {
        // The caller's word is taken: text that is not JSON, vouched for,
        // is the input (which is why only inputs read before may be).
        let text = r#"{"op":"submit","input":[1,}"#;
        assert_eq!(Members::scan(text, DEPTH), None);
        let scanned = Members::scan_knowing(text, DEPTH, |_, _| true).unwrap();
        assert_eq!(scanned.input, Some("[1,"));
        // Not vouched for, the input is read as ever.
        let text = r#"{"op":"submit","input":[1,2]}"#;
        assert_eq!(
            Members::scan_knowing(text, DEPTH, |_, _| false),
            by_serde(text)
        );
    }

    #[test]
    fn offers_only_the_first_input() {
        // A second `input` is not offered: taking it would hide that the
        // member was given twice.
        let text = r#"{"input":1,"input":2}"#;
        let mut offered = vec![];
        let scanned = Members::scan_knowing(text, DEPTH, |_, input| {
            offered.push(input);
            honest(&Members::default(), input)
        });
        assert_eq!(offered, [r#"1,"input":2"#]);
        assert_eq!(scanned, None);
    }

    /// A JSON value drawn from the shapes requests are made of.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| serde_json::to_string(&n).unwrap()),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            "[a-z\"\\\\/]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(("[a-z_]{0,6}", inner), 0..6).prop_map(|v| {
                    let members: Vec<String> =
                        v.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", members.join(" , "))
                }),
            ]
        })
    }

    fn frame() -> impl Strategy<Value = String> {
        let name = prop::sample::select(vec![
            "op",
            "id",
            "input",
            "fn",
            "wait",
            "key",
            "interval_ms",
            "concurrency",
            "task",
            "output",
            "error",
            "max_age_ms",
            "priority",
            "deadline_ms",
            "progress",
            "data",
            "other",
        ]);
        prop::collection::vec((name, value()), 0..5).prop_map(|members| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("\"{k}\":\t{v}"))
                .collect();
            format!(" {{{}}}\n", members.join(","))
        })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json_on_frames(text in frame()) {
            // Keys without escapes, shallow: the scan reads every frame
            // serde_json reads, and declines the rest (a known member twice).
            prop_assert_eq!(Members::scan(&text, DEPTH), by_serde(&text));
        }

        #[test]
        fn reads_the_same_when_inputs_are_vouched_for(text in frame()) {
            // A caller that vouches only for valid values changes what is
            // read (less of the frame), never what the frame is read as.
            prop_assert_eq!(Members::scan_knowing(&text, DEPTH, honest), by_serde(&text));
        }

        #[test]
        fn accepts_nothing_serde_json_refuses(
            text in frame(),
            at in any::<prop::sample::Index>(),
            byte in prop_oneof![
                Just(b'"'), Just(b'\\'), Just(b','), Just(b':'), Just(b'{'), Just(b'}'),
                Just(b'['), Just(b']'), Just(b'-'), Just(b'.'), Just(b'e'), Just(b'0'),
                Just(b'u'), Just(0x01u8), Just(b' '), Just(b'n'),
            ],
            cut in any::<bool>(),
        ) {
            let mut bytes = text.into_bytes();
            let at = at.index(bytes.len() + 1);
            if cut {
                bytes.truncate(at);
            } else {
                bytes.insert(at, byte);
            }
            if let Ok(text) = String::from_utf8(bytes) {
                if let Some(scanned) = Members::scan(&text, DEPTH) {
                    prop_assert_eq!(Some(scanned), by_serde(&text), "{}", text);
                }
                if let Some(scanned) = Members::scan_knowing(&text, DEPTH, honest) {
                    prop_assert_eq!(Some(scanned), by_serde(&text), "vouched: {}", text);
                }
            }
        }
    }
}
