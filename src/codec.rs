//! The gRPC codec of the generated stubs: prost, except that a message that
//! fails to decode is `INVALID_ARGUMENT` (the sender's fault) rather than
//! tonic's default `INTERNAL`, so a malformed request gets a clear error.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// What each call's encoder and decoder allocate up front. tonic's default is 8 KiB each way
/// per call, held for as long as the call is open: a node relaying thousands of quiet streams
/// and conversations holds four of them per conversation. Most envelopes fit in 1 KiB; a
/// larger message grows the buffer as it arrives.
fn buffer_settings() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

/// prost codec with `INVALID_ARGUMENT` for undecodable messages.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstCodec::<T, U>::raw_decoder(buffer_settings()))
    }
}

/// Decodes with prost and reports malformed input as `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!("malformed protobuf message: {}", status.message()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
