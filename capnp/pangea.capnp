# pangea: one schema for the whole system.
#
# The libp2p stream protocol /pangea/compute/1.0.0 carries frames:
#
#     !IQ  header_len (u32), payload_len (u64)      -- 12 bytes, big-endian
#     header_len bytes: one `Message` below, Cap'n Proto standard
#                       (unpacked) serialization with its segment table
#     payload_len bytes: the raw bytes of every array the message names,
#                       concatenated in order, each `ArrayMeta.nbytes` long
#
# Arrays never go through Cap'n Proto on the libp2p stream: building a
# 64 MiB Data field costs 40-90 ms and a copy, while raw bytes after the
# header can be written from and read into numpy buffers without copies.
# Both limits (header and payload) are checked before anything is buffered.
@0xe9c0ce70c5e1a8ce;

# ---------------------------------------------------------------- arrays

struct ArrayMeta {
  # One n-dimensional array whose bytes travel in the frame payload.
  dtype  @0 :Text;          # numpy dtype name, little-endian: "float64", "int32", ...
  shape  @1 :List(UInt64);  # C order
  nbytes @2 :UInt64;        # must equal prod(shape) * itemsize
}

struct Param {
  # A named scalar parameter of a kernel ("factor" of scale, "seed" of random).
  name  @0 :Text;
  value @1 :Float64;
}

# ---------------------------------------------------------------- session

struct Capacity {
  cores       @0 :UInt32;   # os.cpu_count() of the worker
  blasThreads @1 :UInt32;   # threads the BLAS library may use
  gflops      @2 :Float64;  # measured float64 matmul speed at start, 0 if unknown
}

struct Hello {
  # First message on a session stream, sent by both sides. A peer whose
  # protocolVersion differs is refused with an `Error` of kind "incompatible".
  pangeaVersion   @0 :Text;
  protocolVersion @1 :UInt32;
  kernels         @2 :List(Text);
  role            @3 :Text;     # "initiator", "responder", "serve"
  capacity        @4 :Capacity;
  maxPayloadBytes @5 :UInt64;   # the largest frame payload this side accepts
  platform        @6 :Text;     # "cpython-311 x86_64 Linux", for messages only
}

struct TaskRequest {
  taskId   @0 :UInt64;          # unique per session and sender
  kernel   @1 :Text;
  operands @2 :List(ArrayMeta); # bytes in the payload
  params   @3 :List(Param);
}

struct TaskResult {
  taskId         @0 :UInt64;
  outputs        @1 :List(ArrayMeta); # bytes in the payload; empty on error
  errorKind      @2 :Text;            # "" on success; else e.g. "bad-input", "refused", "busy"
  errorMessage   @3 :Text;
  computeSeconds @4 :Float64;         # time the kernel ran on the worker
}

struct Ping { nonce @0 :UInt64; }
struct Pong { nonce @0 :UInt64; }

struct Bye {
  # The sender ends the session on purpose ("done" from the initiator).
  reason @0 :Text;
}

struct Error {
  # A session-level refusal or protocol violation; the sender closes the
  # stream after it.
  kind    @0 :Text;   # "incompatible", "refused", "protocol"
  message @1 :Text;
}

struct Message {
  union {
    hello       @0 :Hello;
    taskRequest @1 :TaskRequest;
    taskResult  @2 :TaskResult;
    ping        @3 :Ping;
    pong        @4 :Pong;
    bye         @5 :Bye;
    error       @6 :Error;
  }
}
