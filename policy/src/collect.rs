//! Every problem of a policy file, not only the first.
//!
//! Parsing stops at the first problem (serde, then the format's own checks). To report
//! the others, the offending member is taken out of the document and the rest parsed
//! again, until it parses or nothing more can be learnt: each problem found on the way
//! is placed in the original text by its JSON path (array indices translated back past
//! the elements taken out). A problem of a member that held what was taken out (a field
//! now missing, a list now empty) may be of the removal's making: it is taken out too,
//! unreported. A problem of the whole document ends the search. The most fundamental
//! problem -- the containment -- is reported first, the rest in the order of the text.

use std::collections::HashMap;

use crate::error::{Diagnostic, PolicyError};
use crate::locate::{locate, parse_path, Seg};

/// Most problems reported for one policy.
const MAX_PROBLEMS: usize = 20;

/// `first` (the error of parsing `text`), with every further problem `reparse` finds in
/// `text` attached to it.
pub(crate) fn every_problem(
    first: PolicyError,
    text: &str,
    reparse: impl Fn(&str) -> Result<(), PolicyError>,
) -> PolicyError {
    let PolicyError::Invalid(head) = &first else {
        return first;
    };
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(text) else {
        return first;
    };
    let mut found: Vec<Diagnostic> = vec![(**head).clone()];
    let mut removed = Removed::default();
    // What was taken out, as paths of the original document.
    let mut taken: Vec<String> = Vec::new();
    // The path of the last problem in the document as it is now (after removals).
    let mut current = head.path.clone();
    for _ in 0..2 * MAX_PROBLEMS {
        if found.len() >= MAX_PROBLEMS {
            break;
        }
        let original_current = removed.original_path(&current);
        if !removable(&current) || !removed.take_out(&mut doc, &current) {
            break;
        }
        taken.push(original_current);
        let Ok(edited) = serde_json::to_string_pretty(&doc) else {
            break;
        };
        let next = match reparse(&edited) {
            Err(PolicyError::Invalid(next)) => next,
            _ => break,
        };
        if next.path.is_empty() {
            break;
        }
        let original = removed.original_path(&next.path);
        current = next.path.clone();
        // A problem of a member that holds something taken out (now missing or empty)
        // may be of our making: take it out too, unreported.
        if taken.iter().any(|t| within(t, &original)) {
            continue;
        }
        if found.iter().any(|d| d.path == original) {
            break;
        }
        let on_key = locate(&edited, &parse_path(&next.path))
            .and_then(|l| l.key)
            .is_some_and(|k| Some(k.line) == next.line && Some(k.column) == next.column);
        let place = locate(text, &parse_path(&original)).map(|l| match l.key {
            Some(k) if on_key => k,
            _ => l.value,
        });
        found.push(Diagnostic {
            path: original,
            line: place.map(|p| p.line),
            column: place.map(|p| p.column),
            also: Vec::new(),
            ..*next
        });
    }
    if found.len() == 1 {
        return first;
    }
    // The containment first (nothing else matters if it cannot run here), then the
    // order of the text.
    found.sort_by_key(|d| {
        (
            !d.path.starts_with("containment"),
            d.line.unwrap_or(usize::MAX),
            d.column.unwrap_or(usize::MAX),
        )
    });
    let mut rest = found.into_iter();
    let Some(mut lead) = rest.next() else {
        return first;
    };
    lead.also = rest.collect();
    PolicyError::Invalid(Box::new(lead))
}

/// Whether taking the member at `path` out can tell us more: not the whole document,
/// not the version (it decides the format).
fn removable(path: &str) -> bool {
    !path.is_empty() && path != "version"
}

/// Whether `path` is `outer` or lies inside it.
fn within(path: &str, outer: &str) -> bool {
    path == outer
        || path
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// The array elements taken out so far, by the array's path in the original document.
#[derive(Default)]
struct Removed {
    indices: HashMap<String, Vec<usize>>,
}

impl Removed {
    /// Take the member at `path` (a path of the document as it is now) out of `doc`.
    fn take_out(&mut self, doc: &mut serde_json::Value, path: &str) -> bool {
        let segs = parse_path(path);
        let Some((last, parents)) = segs.split_last() else {
            return false;
        };
        let mut cur = &mut *doc;
        for seg in parents {
            let next = match seg {
                Seg::Key(k) => cur.get_mut(k.as_str()),
                Seg::Index(i) => cur.get_mut(*i),
            };
            let Some(next) = next else { return false };
            cur = next;
        }
        match (last, cur) {
            (Seg::Key(k), serde_json::Value::Object(map)) => map.remove(k.as_str()).is_some(),
            (Seg::Index(i), serde_json::Value::Array(items)) if *i < items.len() => {
                let array = self.original_path(&render(parents));
                let original = self.original_index(&array, *i);
                items.remove(*i);
                let list = self.indices.entry(array).or_default();
                list.push(original);
                list.sort_unstable();
                true
            }
            _ => false,
        }
    }

    /// The index in the original array of element `i` of the array as it is now.
    fn original_index(&self, array: &str, i: usize) -> usize {
        let mut index = i;
        if let Some(gone) = self.indices.get(array) {
            for g in gone {
                if *g <= index {
                    index += 1;
                }
            }
        }
        index
    }

    /// A path of the document as it is now, as a path of the original document.
    fn original_path(&self, path: &str) -> String {
        let mut out: Vec<Seg> = Vec::new();
        for seg in parse_path(path) {
            match seg {
                Seg::Index(i) => {
                    let array = render(&out);
                    out.push(Seg::Index(self.original_index(&array, i)));
                }
                key => out.push(key),
            }
        }
        render(&out)
    }
}

/// `a.b[2].c` from its segments.
fn render(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_translate_back_past_removed_elements() {
        let mut doc = serde_json::json!({"a": {"b": [0, 1, 2, 3, 4]}});
        let mut removed = Removed::default();
        assert!(removed.take_out(&mut doc, "a.b[1]"));
        // Now [0, 2, 3, 4]: element 1 is the original 2.
        assert_eq!(removed.original_path("a.b[1]"), "a.b[2]");
        assert!(removed.take_out(&mut doc, "a.b[0]"));
        // Now [2, 3, 4].
        assert_eq!(removed.original_path("a.b[0]"), "a.b[2]");
        assert_eq!(removed.original_path("a.b[2]"), "a.b[4]");
        assert!(removed.take_out(&mut doc, "a.b[1]"));
        assert_eq!(doc, serde_json::json!({"a": {"b": [2, 4]}}));
        assert_eq!(removed.original_path("a.b[1]"), "a.b[4]");
        assert!(!removed.take_out(&mut doc, "a.c"));
        assert!(!removed.take_out(&mut doc, "a.b[9]"));
    }
}
