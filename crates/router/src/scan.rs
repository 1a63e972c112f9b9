//! Byte searches on the stream path. Every streamed chunk is searched for
//! its usage, its end and its kind, so each fixed needle's SIMD searcher
//! (`memchr::memmem`) is built once, not per chunk.

use memchr::memmem::{Finder, FinderRev};
use std::sync::LazyLock;

/// `static NAME: Finder` for a fixed needle, built on first use.
macro_rules! needles {
    ($($name:ident = $bytes:expr;)*) => {
        $(pub(crate) static $name: LazyLock<Finder<'static>> =
            LazyLock::new(|| Finder::new($bytes));)*
    };
}

needles! {
    USAGE_KEY = b"\"usage\"";
    EVENT_END = b"\n\n";
    NO_CHOICES = b"\"choices\":[]";
    NO_CHOICES_SPACED = b"\"choices\": []";
    ROLE_KEY = b"\"role\"";
    CONTENT_KEY = b"\"content\"";
    EMPTY_CONTENT = b"\"content\":\"\"";
    FINISHED = b"\"finish_reason\":\"";
    TOOL_CALLS_KEY = b"\"tool_calls\"";
}

/// The last event end (`\n\n`) of a buffer, searched from its end.
pub(crate) static LAST_EVENT_END: LazyLock<FinderRev<'static>> =
    LazyLock::new(|| FinderRev::new(b"\n\n"));

/// Whether `needle` occurs in `hay` (for needles searched once per request).
pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// Whether the fixed `needle` occurs in `hay`.
pub(crate) fn has(hay: &[u8], needle: &Finder<'_>) -> bool {
    needle.find(hay).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needles_find_what_they_name() {
        let ev = b"data: {\"choices\":[],\"usage\":{}}\n\n";
        assert_eq!(USAGE_KEY.find(ev), Some(20));
        assert_eq!(EVENT_END.find(ev), Some(ev.len() - 2));
        assert!(has(ev, &NO_CHOICES) && !has(ev, &NO_CHOICES_SPACED));
        assert_eq!(LAST_EVENT_END.rfind(b"a\n\nb\n\nc"), Some(4));
        assert!(contains(ev, b"usage") && !contains(ev, b"role"));
    }
}
