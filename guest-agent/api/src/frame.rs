//! Length-prefixed framing: a big-endian u32 length, then that many bytes.

use std::io::{self, Read, Write};

use prost::Message;

use crate::MAX_FRAME;

/// Writes `msg` as one frame.
pub fn write_frame<M: Message, W: Write>(w: &mut W, msg: &M) -> io::Result<()> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).map_err(io::Error::other)?;
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame and decodes it. EOF before the length is `UnexpectedEof`.
pub fn read_frame<M: Message + Default, R: Read>(r: &mut R) -> io::Result<M> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    M::decode(buf.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Ping, Request, request};

    #[test]
    fn round_trip_and_limits() {
        let req = Request {
            id: 7,
            body: Some(request::Body::Ping(Ping {})),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        let back: Request = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);

        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_frame::<Request, _>(&mut huge.as_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert_eq!(
            read_frame::<Request, _>(&mut garbage.as_slice())
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            read_frame::<Request, _>(&mut [0u8, 0].as_slice())
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
