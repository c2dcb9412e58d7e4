//! The accepted connection shared by the example programs (`worker.rs`, `probe.rs`, both
//! include it with `#[path]`): a TCP or unix stream with `Read`/`Write` and the socket
//! settings they need.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// An accepted connection.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Read and write timeouts; `nodelay` also disables Nagle's algorithm on TCP.
    pub fn configure(&self, read: Duration, write: Duration, nodelay: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                if nodelay {
                    s.set_nodelay(true)?;
                }
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            Self::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
        }
    }

    pub fn shutdown_write(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Write),
            Self::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
