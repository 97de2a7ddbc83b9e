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
  nbytes @2 :UInt64;        # must equal prod(shape) * itemsize (0 when held)
  held   @3 :UInt64;        # nonzero with nbytes 0: no bytes follow, the operand is the array the
                            # receiver holds for this session under this id (kept before); nonzero
                            # with bytes: keep this operand under this id too, for the next tasks
  codec  @4 :Text;          # "": its nbytes follow as they are; "blosc-lz4": `stored` bytes follow,
                            # one c-blosc 1.x frame (byte shuffle, lz4) of exactly nbytes (sent only
                            # to a peer whose Hello lists the codec)
  stored @5 :UInt64;        # with a codec: the bytes in the payload
}

struct Param {
  # A named parameter of a kernel: a number ("factor" of scale, "axis"), a text
  # ("UPLO" of eigh, the subscripts of einsum) or a list of integers (axes, a shape).
  name  @0 :Text;
  value @1 :Float64;        # kind 0
  text  @2 :Text;           # kind 1, at most 256 characters
  ints  @3 :List(Int64);    # kind 2, at most 64 entries
  kind  @4 :UInt8;          # 0 number, 1 text, 2 ints
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
  pairingProof    @7 :Data;     # HMAC-SHA256(code, "pangea-pair-v1|<acceptor id>|<dialer id>"), or empty
  instanceId      @8 :UInt64;   # random per process: two processes with one peer id are a copied identity
  # The TLS data plane (protocol 2). Both sides announce their port and the
  # SHA-256 of their ephemeral certificate; only this Hello, inside the
  # Noise-authenticated session, vouches for that certificate.
  dataPort        @9 :UInt16;   # TCP port of the sender's data plane, 0: none
  dataCert        @10 :Data;    # SHA-256 of the DER certificate that port presents
  dataToken       @11 :Data;    # acceptor only: one-time 32-byte secret the dialer presents there
  # One pangea home, two processes: the second (e.g. `bench`) runs on a
  # throwaway identity and vouches for itself with the home's key.
  hostId          @12 :Data;    # 16 bytes naming the sender's machine (hash of its machine id), or empty
  homeId          @13 :Text;    # the peer id of the pangea home the sender runs from, when not its own
  homeProof       @14 :Data;    # Ed25519 signature of "pangea-home-v1|<acceptor id>|<dialer id>" by homeId's key
  codecs          @15 :List(Text);  # the codecs of arrays the sender decodes ("blosc-lz4"); empty: none
}

struct TaskRequest {
  taskId   @0 :UInt64;          # unique per session and sender
  kernel   @1 :Text;
  operands @2 :List(ArrayMeta); # bytes in the payload
  params   @3 :List(Param);
  keep     @4 :UInt64;          # nonzero: keep output 0 for this session under this id (answer: no outputs)
}

struct TaskResult {
  taskId         @0 :UInt64;
  outputs        @1 :List(ArrayMeta); # bytes in the payload; empty on error
  errorKind      @2 :Text;            # "" on success; else "bad-input", "refused", "busy", "deadline", ...
  errorMessage   @3 :Text;
  computeSeconds @4 :Float64;         # time the kernel ran on the worker
}

struct Ping {
  nonce @0 :UInt64;
  load  @1 :UInt32;   # tasks the sender is running or has queued for its peers
}
struct Pong {
  nonce @0 :UInt64;
  load  @1 :UInt32;
}

struct Cancel {
  # The sender no longer wants the result of its task `taskId`: a worker that
  # has not started it drops it, one that has finishes silently.
  taskId @0 :UInt64;
}

struct DataPlane {
  # From the dialer, on the libp2p stream: how its data plane connection went.
  # ok=false: every message stays on the libp2p stream; `reason` says why.
  ok     @0 :Bool;
  reason @1 :Text;
}

struct Release {
  # The sender no longer needs the arrays the receiver holds for it under these ids.
  ids @0 :List(UInt64);
}

struct Bye {
  # The sender ends the session on purpose ("done" from the initiator).
  reason @0 :Text;
}

struct Error {
  # A session-level refusal or protocol violation; the sender closes the
  # stream after it.
  kind    @0 :Text;   # "incompatible", "refused", "protocol", "duplicate-identity"
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
    cancel      @7 :Cancel;
    dataPlane   @8 :DataPlane;
    release     @9 :Release;
  }
}

# ================================================================ RPC
#
# External programs talk to a `serve` node over Cap'n Proto RPC (TCP,
# default 127.0.0.1:7780). The bootstrap capability is a `Gate`; `login`
# with the node's token (empty when the node needs none) returns the
# `Compute` capability. Arrays travel inside RPC messages as `Array`, their
# bytes split into chunks below Cap'n Proto's 512 MiB limit per Data field.
#
# The bulk channel (same box only): beside a loopback endpoint, `serve` listens
# on a Unix socket (SOCK_SEQPACKET, 0600 in a 0700 directory; its path is in the
# node's session file). A client of the same user sends "H" + its RPC token
# (answer "K", or "E" + reason and close; the node also checks SO_PEERCRED is
# its own uid), then per task "S" + 16 random bytes naming a batch + one kind
# byte per segment ("r": an operand the node maps read-only, "w": the output),
# with the segments as SCM_RIGHTS descriptors: memfds sealed against shrinking
# and growing. The node answers "K" + name, or "E" + name + reason. The task's
# `TaskSpec.bulkBatch` names the batch, each operand's `Array.shared` its
# segment (chunks empty), and `outputSegment` where the node writes the output
# (its `TaskOutput.outputs[0].shared` set, chunks empty; if it does not fit,
# the output travels in the message). A task ends its batch: the node unmaps it.
# A client that does not use the channel sends bytes in `chunks`, as always.
#
# The bulk channel over TLS (a client on another box): a TLS endpoint (`login`
# answers tlsBulk = true) also takes connections to the same port, with the same
# certificate, whose first bytes are "PGBULK1\n". After that line come control
# frames, each a type byte, a 4-byte big-endian length and a payload: "H" + the
# RPC token (answer "K", or "E" + "bad-input\n" + reason and close), then per
# task "U" + 16 random bytes naming a batch + a count byte + per segment a kind
# byte ("r": an operand, "w": the output, last) and its size (8 bytes,
# big-endian). The node charges the operands to its memory budget and answers
# "K" + name (or "E" + name + an error kind + "\n" + reason); then the client
# sends each operand's C-order little-endian bytes, in order, raw, and the node
# answers "K" + name once they are in. The task names the batch as above. When
# the node writes the output there, it sends "R" + name + size (8 bytes), then
# the output's bytes, on that connection before the task's answer, whose
# `outputs[0].shared` is set. One task at a time per connection.

struct SharedSlice {
  segment @0 :UInt32;       # 1 + the index of the segment in the task's batch; 0: the bytes are in `chunks`
  offset  @1 :UInt64;       # where the array's C-order, little-endian bytes start in the segment
}

struct Array {
  dtype  @0 :Text;          # numpy dtype name, little-endian: "float64", ...
  shape  @1 :List(UInt64);
  chunks @2 :List(Data);    # the C-order bytes, concatenated in order
  shared @3 :SharedSlice;   # segment > 0: the bytes are in a shared segment instead (the bulk channel)
  held   @4 :UInt32;        # 1 + the index in TaskSpec.arrays of the RemoteArray this operand is (dtype
                            # and shape say what it holds, chunks empty); 0: the bytes are here
}

# Arrays that stay remote: a task with `keep` leaves its outputs on the node and
# answers with one `RemoteArray` capability per output (`TaskOutput.kept`; the
# `outputs` then carry only dtype and shape, `held` = 1 + the index in `kept`).
# A later task names a held array as an operand by passing the capability back
# in `TaskSpec.arrays` and setting that operand's `held`. The node keeps the
# array while any client holds the capability: dropping the last reference (or
# the connection) releases it, and its bytes leave the node's memory budget.
# A capability that is not one of the node's own arrays is refused (the node
# recognises its own by calling `claim` with a random nonce on what it got).
interface RemoteArray {
  info  @0 () -> (dtype :Text, shape :List(UInt64), nbytes :UInt64, holder :Text, verification :Text);
  # holder: "local" (the node you talk to) or the peer id of the worker that holds it
  get   @1 () -> (array :Array, errorKind :Text, errorMessage :Text);
  # the bytes in the message (up to the node's RPC message limit; a task with kernel "copy" and the
  # array as operand brings larger ones back on the bulk channel)
  claim @2 (nonce :Data) -> ();
  # used by the node itself to recognise its own capabilities; a client has no use for it
}

struct TaskSpec {
  kernel         @0 :Text;
  operands       @1 :List(Array);
  params         @2 :List(Param);
  placement      @3 :Text;     # "auto" (default when empty), "local", "remote", or a peer id
  timeoutSeconds @4 :Float64;  # 0: the node's default
  noFallback     @5 :Bool;     # fail instead of running locally because no remote worker is usable
  bulkBatch      @6 :Data;     # the 16-byte name of the task's segments on the bulk channel; empty: none
  outputSegment  @7 :UInt32;   # 1 + the index of the segment to write the output into; 0: in the message
  check          @8 :Text;     # "": the kernel's own check of a remote result; "recompute": the node
                               # recomputes it and compares; "none": taken as sent (unverified)
  keep           @9 :Bool;     # leave the outputs on the node: TaskOutput.kept answers with handles
  arrays         @10 :List(RemoteArray);  # the held arrays the operands name (Array.held)
  key            @11 :Text;    # the client's name for the task (at most 128 printable characters), unique
                               # on the node: a second submit with the same key attaches to the first task
                               # (its answer, once) instead of running it again; "": none
  detach         @12 :Bool;    # answer as soon as the task is journaled (TaskOutput.taskId, no outputs),
                               # not when it is done: collect its answer later with `result`
}

struct Timings {
  queueSeconds    @0 :Float64;  # from arrival until the first attempt started
  transferSeconds @1 :Float64;  # moving operands and results between nodes
  computeSeconds  @2 :Float64;  # the kernel itself, where it ran
  totalSeconds    @3 :Float64;
}

struct AttemptInfo {
  worker  @0 :Text;   # "local" or a peer id
  outcome @1 :Text;   # "ok" or "<kind>: <message>"
}

struct TaskOutput {
  outputs      @0 :List(Array);   # empty on error
  errorKind    @1 :Text;          # "" on success; "bad-input", "refused", "unavailable", ...
  errorMessage @2 :Text;
  ranOn        @3 :Text;          # "local" or the peer id that produced the result
  attempts     @4 :List(AttemptInfo);
  timings      @5 :Timings;
  fallbackReason @6 :Text;        # why it ran locally when no remote worker was usable, "" otherwise
  verified     @7 :Bool;          # the node checked the result (a remote worker's: Freivalds or the kernel's check)
  verification @8 :Text;          # how: "local" (ran here), "freivalds", "residual", "projection", "recompute", "unverified"
  kept         @9 :List(RemoteArray);  # with TaskSpec.keep: one handle per output, in order
  taskId       @10 :Text;          # the node's id of the task in its queue ("" when not journaled)
}

struct TaskInfo {
  # One task of the node's queue (the `tasks` call): what it is and where it stands.
  taskId       @0 :Text;
  key          @1 :Text;          # the client's key, "" when none
  kernel       @2 :Text;
  state        @3 :Text;          # "queued", "running", "done" (its result waits for its client),
                                  # "failed" (its error waits), "collected" (answered: kept for listing)
  acceptedUnix @4 :Float64;       # when the node accepted it, seconds since the epoch
  finishedUnix @5 :Float64;       # when it finished, 0 before
  error        @6 :Text;          # "<kind>: <message>" of a failed task, "" otherwise
  resultBytes  @7 :UInt64;        # bytes of its result waiting on the node's disk
  runs         @8 :UInt32;        # how many times it started (more than 1: the node restarted under it)
}

struct Suspicion {
  # Why this node does not fully trust a worker's results; state "" (the default): it does.
  peerId           @0 :Text;
  state            @1 :Text;     # "suspect" (waits for a canary), "probing" (canary out), "probation"
  reason           @2 :Text;     # the failure that made it suspect, e.g. "... failed verification: ..."
  sinceUnix        @3 :Float64;  # when it stopped being trusted, seconds since the epoch
  nextProbeSeconds @4 :Float64;  # until its next canary task (state "suspect"), else 0
  goodResults      @5 :UInt32;   # verified results since its canary passed (state "probation")
  text             @6 :Text;     # all of it in one phrase, for people
}

struct PeerInfo {
  peerId        @0 :Text;
  addresses     @1 :List(Text);
  version       @2 :Text;
  kernels       @3 :List(Text);
  rttMs         @4 :Float64;   # last measured; 0 when unknown
  tasksDone     @5 :UInt64;    # tasks this node had done by that peer
  role          @6 :Text;
  trusted       @7 :Bool;      # whether this node runs tasks for that peer
  lastSeenSeconds @8 :Float64; # seconds since the last message from it
  dataPlane     @9 :Text;      # "TLS 1.3 ... to host:port", or "libp2p stream (why)"
  suspicion     @10 :Suspicion; # state "": trusted
  connectedSeconds @11 :Float64; # age of this session (a reconnect starts a new one)
  dataBytesIn   @12 :UInt64;     # bytes received on the current data connection (0 without one)
  dataBytesOut  @13 :UInt64;     # bytes sent on the current data connection
}

struct NodeStatus {
  peerId        @0 :Text;
  addresses     @1 :List(Text);
  version       @2 :Text;
  uptimeSeconds @3 :Float64;
  tasksDone     @4 :UInt64;
  tasksFailed   @5 :UInt64;
  tasksInFlight @6 :UInt64;
  bytesIn       @7 :UInt64;
  bytesOut      @8 :UInt64;
  rpcAddress    @9 :Text;
  peerCount     @10 :UInt32;
  tasksServed   @11 :UInt64;   # tasks this node ran for its peers (tasksDone: tasks submitted here)
  suspects      @12 :List(Suspicion);  # remote workers not fully trusted, connected or not
  tasksCancelled @13 :UInt64;  # of those, tasks their sender gave up (a Cancel) and this node dropped
  # What the node turned away to protect itself, since it started:
  rpcCallsRefused @14 :UInt64;        # RPC calls answered "busy": too many in flight
  rpcTasksRefused @15 :UInt64;        # RPC tasks over the memory budget
  streamsRefused @16 :UInt64;         # libp2p streams past the node-wide caps of streams awaiting a Hello
  dataHandshakesEvicted @17 :UInt64;  # data-plane handshakes cancelled to make room for a newer one
  memoryBudgetUsedBytes @18 :UInt64;  # bytes of the memory budget held now (peers' and RPC tasks)
  memoryBudgetBytes @19 :UInt64;      # the memory budget (--memory-budget-mib)
  strangerConnectionsClosed @20 :UInt64;  # libp2p connections of untrusted peers closed: too many, or no session in time
  heldBytes     @21 :UInt64;      # bytes of the arrays this node holds for clients (RemoteArray), in its budget
  heldArrays    @22 :UInt32;      # how many
  # The durable task queue (journal: "" when the node keeps none)
  queueJournal  @23 :Text;        # the journal's file
  queueTasks    @24 :UInt32;      # tasks not answered yet: queued, running, or their result waiting
  queueWaiting  @25 :UInt32;      # of those, results (or errors) waiting for their client
  stateBytes    @26 :UInt64;      # bytes the queue holds on disk and has reserved (operands, results)
  stateMaxBytes @27 :UInt64;      # its quota (--state-max-gib)
  stateRetentionSeconds @28 :Float64;  # how long a result waits for its client (--state-retention-hours)
  queueRecovered @29 :UInt32;     # tasks read back from the journal when the node started
  queueRefused  @30 :UInt64;      # tasks refused since it started: too many waiting, or over its quota
}

struct KernelInfo {
  # One kernel the node runs for RPC clients, as its registry and its limits say.
  name        @0 :Text;
  operands    @1 :UInt32;        # how many arrays it takes
  params      @2 :List(Text);    # the names of its parameters (TaskSpec.params)
  dtypes      @3 :List(Text);    # the dtypes its operands may have; empty when it takes none
  description @4 :Text;          # one line, e.g. "matrix product a @ b"
  maxNdim     @5 :UInt32;        # dimensions an operand may have, at most
  maxElements @6 :UInt64;        # elements an operand (and the result) may have, at most
  verification @7 :Text;         # how the node checks a remote worker's result; empty: taken as sent;
                                 # "unverified": the kernel has no check (TaskSpec.check "recompute" asks for one)
  outputs     @8 :UInt32;        # how many arrays it returns (svd: 3)
  variadic    @9 :Bool;          # it takes `operands` up to 64 arrays (concatenate, einsum)
}

interface Compute {
  # Every method answers a bad argument or a failure with errorKind (""
  # on success; "bad-input", "unreachable", "refused", "unavailable",
  # "internal", ...) and a one-line errorMessage in its results, never with
  # an exception (pycapnp would send the server's traceback with it).
  submit  @0 (task :TaskSpec) -> (result :TaskOutput);
  peers   @1 () -> (peers :List(PeerInfo), errorKind :Text, errorMessage :Text);
  status  @2 () -> (status :NodeStatus, errorKind :Text, errorMessage :Text);
  connect @3 (multiaddr :Text) -> (peer :PeerInfo, errorKind :Text, errorMessage :Text);
  kernels @4 () -> (kernels :List(KernelInfo), errorKind :Text, errorMessage :Text);
  result  @5 (task :Text, timeoutSeconds :Float64) -> (result :TaskOutput);
  # the answer of a task of the queue, by its id (TaskOutput.taskId) or its key, as `submit` would
  # have given it; waits up to timeoutSeconds (0: the node's default) while it is queued or running.
  # Answered once: after that the task is "collected" (errorKind "not-found": the node has no such task).
  tasks   @6 () -> (tasks :List(TaskInfo), errorKind :Text, errorMessage :Text);
  # the tasks of the queue, oldest first (collected ones until the retention time)
  cancel  @7 (task :Text) -> (errorKind :Text, errorMessage :Text);
  # cancel a task of the queue by its id or key (a client that gives up on it: a call that merely
  # ends with its connection leaves the task running, for `result`)
}

interface Gate {
  login @0 (token :Text) -> (compute :Compute, maxMessageBytes :UInt64, error :Text,
                             memoryBudgetBytes :UInt64, tlsBulk :Bool);
  # tlsBulk: this TLS endpoint also takes bulk channels over TLS (see above).
  # A wrong or missing token: `error` says so and `compute` is null (a result,
  # not an exception: pycapnp would send the server's traceback with it).
  # maxMessageBytes: the node's largest RPC message (--rpc-max-mib, by default
  # half its memory budget plus room), memoryBudgetBytes: its memory budget
  # (--memory-budget-mib; 0 from an older node), so a client can refuse a
  # request that cannot fit before sending a byte of it. (A parameter list numbers its fields in
  # order: a new result goes last, so older clients and nodes read the same bytes.)
}
