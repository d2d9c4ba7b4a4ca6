//! Finds the line and column of a JSON path in a policy file's text, so that errors
//! found after parsing (conflicting fields, duplicate variables) still point at the
//! field. The text has already been accepted by serde_json, so nesting is bounded by
//! serde_json's recursion limit; on anything unexpected the locator simply gives up.

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// One step of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Where a path was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Located {
    /// The member's key, when the last step is an object key that exists.
    pub key: Option<Pos>,
    /// The value at the path, or the deepest existing container on the way.
    pub value: Pos,
}

/// Splits `a.b[2].c` into segments. `.` alone (serde_path_to_error's root) and the empty
/// string are the root.
pub(crate) fn parse_path(path: &str) -> Vec<Seg> {
    let mut segs = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            if i > 0 {
                segs.push(Seg::Key(rest[..i].to_string()));
            }
            rest = &rest[i..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(end) = stripped.find(']') else { break };
                if let Ok(n) = stripped[..end].parse() {
                    segs.push(Seg::Index(n));
                }
                rest = &stripped[end + 1..];
            }
        } else if !rest.is_empty() {
            segs.push(Seg::Key(rest.to_string()));
        }
    }
    segs
}

/// The value at `path` in a parsed document.
pub(crate) fn value_at<'v>(
    v: &'v serde_json::Value,
    path: &[Seg],
) -> Option<&'v serde_json::Value> {
    path.iter().try_fold(v, |cur, seg| match seg {
        Seg::Key(k) => cur.get(k.as_str()),
        Seg::Index(i) => cur.get(*i),
    })
}

/// Locates `path` in `text`.
pub(crate) fn locate(text: &str, path: &[Seg]) -> Option<Located> {
    let mut s = Scanner {
        b: text.as_bytes(),
        text,
        i: 0,
    };
    s.ws();
    s.find(path, None)
}

struct Scanner<'a> {
    b: &'a [u8],
    text: &'a str,
    i: usize,
}

impl Scanner<'_> {
    fn pos_of(&self, i: usize) -> Pos {
        let before = &self.text.as_bytes()[..i];
        let line = before.iter().filter(|&&c| c == b'\n').count() + 1;
        let start = before
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |p| p + 1);
        let column = self
            .text
            .get(start..i)
            .map_or(i - start, |s| s.chars().count())
            + 1;
        Pos { line, column }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek() == Some(c)).then(|| self.i += 1)
    }

    /// At the start of a value: descend along `path`.
    fn find(&mut self, path: &[Seg], key: Option<Pos>) -> Option<Located> {
        self.ws();
        let here = Located {
            key,
            value: self.pos_of(self.i),
        };
        let Some((seg, rest)) = path.split_first() else {
            return Some(here);
        };
        match (self.peek()?, seg) {
            (b'{', Seg::Key(want)) => {
                self.i += 1;
                loop {
                    self.ws();
                    match self.peek()? {
                        b'}' => return Some(here),
                        b',' => self.i += 1,
                        b'"' => {
                            let kpos = self.pos_of(self.i);
                            let k = self.string()?;
                            self.eat(b':')?;
                            if &k == want {
                                return self.find(rest, Some(kpos));
                            }
                            self.skip_value()?;
                        }
                        _ => return None,
                    }
                }
            }
            (b'[', Seg::Index(want)) => {
                self.i += 1;
                let mut n = 0;
                loop {
                    self.ws();
                    match self.peek()? {
                        b']' => return Some(here),
                        b',' => self.i += 1,
                        _ => {
                            if n == *want {
                                return self.find(rest, None);
                            }
                            self.skip_value()?;
                            n += 1;
                        }
                    }
                }
            }
            _ => Some(here),
        }
    }

    /// Reads a string literal (the scanner is on its opening quote) and decodes it.
    fn string(&mut self) -> Option<String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let rest = self.text.get(self.i..)?;
            let j = rest.find(['"', '\\'])?;
            out.push_str(&rest[..j]);
            self.i += j;
            if self.peek()? == b'"' {
                self.i += 1;
                return Some(out);
            }
            self.i += 1;
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'n' => out.push('\n'),
                b't' => out.push('\t'),
                b'r' => out.push('\r'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'u' => {
                    let hex = self.text.get(self.i..self.i + 4)?;
                    self.i += 4;
                    let cp = u32::from_str_radix(hex, 16).ok()?;
                    out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                }
                other => out.push(char::from(other)),
            }
        }
    }

    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
                ) {
                    self.i += 1;
                }
                Some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "{\n  \"a\": 1,\n  \"fs\": {\"ro\": [\"x\", \"y\\\"z\", {\"k\": true}]},\n  \"é\": \"ü\", \"b\": null\n}";

    fn at(path: &str) -> Option<Located> {
        locate(DOC, &parse_path(path))
    }

    #[test]
    fn parse_path_splits_keys_and_indexes() {
        let segs = parse_path("filesystem.readonly[2].x[0][1]");

        assert_eq!(
            segs,
            vec![
                Seg::Key("filesystem".into()),
                Seg::Key("readonly".into()),
                Seg::Index(2),
                Seg::Key("x".into()),
                Seg::Index(0),
                Seg::Index(1),
            ]
        );
    }

    #[test]
    fn root_is_the_first_brace() {
        assert_eq!(parse_path("."), vec![]);
        assert_eq!(at(".").map(|l| l.value), Some(Pos { line: 1, column: 1 }));
    }

    #[test]
    fn finds_key_and_value_positions() {
        let l = at("a");

        assert_eq!(
            l,
            Some(Located {
                key: Some(Pos { line: 2, column: 3 }),
                value: Pos { line: 2, column: 8 }
            })
        );
    }

    #[test]
    fn finds_array_elements_after_escaped_strings() {
        let l = at("fs.ro[2].k");

        assert_eq!(
            l.map(|l| l.value),
            Some(Pos {
                line: 3,
                column: 36
            })
        );
    }

    #[test]
    fn counts_columns_in_characters() {
        let l = at("b");

        assert_eq!(
            l.map(|l| l.value),
            Some(Pos {
                line: 4,
                column: 18
            })
        );
    }

    #[test]
    fn missing_member_gives_the_deepest_container() {
        let l = at("fs.rw[0]");

        assert_eq!(l.map(|l| l.value), Some(Pos { line: 3, column: 9 }));
    }
}
