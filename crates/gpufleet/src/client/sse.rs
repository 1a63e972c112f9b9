//! A small Server-Sent Events parser over a byte stream: lines of `field:
//! value`, events separated by a blank line, `data` lines joined with `\n`,
//! comments (`:`) ignored.

use futures::{Stream, StreamExt};

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// `event:`; "message" when absent.
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Incremental parser: feed bytes, take complete events.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    id: Option<String>,
}

impl Parser {
    /// Adds bytes; returns the events they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if let Some(ev) = self.line(&line) {
                out.push(ev);
            }
        }
        out
    }

    fn line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            if self.data.is_empty() && self.event.is_none() {
                return None;
            }
            return Some(Event {
                event: self.event.take().unwrap_or_else(|| "message".to_string()),
                data: std::mem::take(&mut self.data).join("\n"),
                id: self.id.take(),
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => self.data.push(value.to_string()),
            "id" => self.id = Some(value.to_string()),
            _ => {}
        }
        None
    }
}

/// The events of an SSE response body.
pub fn events(resp: reqwest::Response) -> impl Stream<Item = Result<Event, reqwest::Error>> {
    let mut parser = Parser::default();
    resp.bytes_stream().flat_map(move |chunk| {
        let items: Vec<Result<Event, reqwest::Error>> = match chunk {
            Ok(bytes) => parser.feed(&bytes).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(items)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut p = Parser::default();
        assert!(p.feed(b": keep-alive\n\nevent: instance\nda").is_empty());
        assert!(p.feed(b"ta: {\"a\":1}\r\n").is_empty());
        let evs = p.feed(b"\ndata: x\ndata: y\nid: 7\n\n");
        assert_eq!(
            evs,
            vec![
                Event {
                    event: "instance".into(),
                    data: "{\"a\":1}".into(),
                    id: None
                },
                Event {
                    event: "message".into(),
                    data: "x\ny".into(),
                    id: Some("7".into())
                },
            ]
        );
    }
}
