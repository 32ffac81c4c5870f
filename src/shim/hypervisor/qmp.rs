//! QMP, QEMU's control socket: asking QEMU to quit.

use std::io;
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// QMP: read the greeting, leave negotiation mode, ask QEMU to quit.
pub(super) async fn qmp_quit(socket: &Path) -> io::Result<()> {
    let stream = UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let greeting = next_line(&mut lines).await?;
    if !greeting.contains("\"QMP\"") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a QMP greeting: {greeting}"),
        ));
    }
    write
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .await?;
    // Events may come first; the reply is the line with "return" or "error".
    let reply = loop {
        let line = next_line(&mut lines).await?;
        if !line.contains("\"event\"") {
            break line;
        }
    };
    if !reply.contains("\"return\"") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("qmp_capabilities refused: {reply}"),
        ));
    }
    write.write_all(b"{\"execute\":\"quit\"}\n").await?;
    // Stay connected until QEMU has taken the command: a quit followed at once by a hang-up can
    // be dropped with the connection. Its reply, or QEMU closing the socket as it exits, will do.
    loop {
        match lines.next_line().await? {
            None => return Ok(()),
            Some(line) if line.contains("\"return\"") => return Ok(()),
            Some(line) if line.contains("\"error\"") => {
                return Err(io::Error::other(format!("quit refused: {line}")))
            }
            Some(_) => {}
        }
    }
}

async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> io::Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed early"))
}
