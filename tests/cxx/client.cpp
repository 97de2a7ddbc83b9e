// A client of a pangea node's RPC endpoint written against the reference C++
// Cap'n Proto library (Debian's libcapnp-dev), not pycapnp: it proves the
// schema in capnp/pangea.capnp is all another implementation needs.
//
//   client HOST:PORT TOKEN COMMAND [N]
//
// Commands (each prints one JSON object per line on stdout):
//   login      log in and print what the Gate answered
//   kernels    the kernels the node lists
//   status     a few fields of the node's status
//   matmul N   an N x N matmul of two arrays made from a formula; the sum of the result
//   bad        a matmul of shapes that do not fit: the error kind and message
//   pipelined  status called on the promise of login, before login returns
//   handle N   put an N x N array (copy, keep=true), hold its RemoteArray capability,
//              use it twice as the operands of an add kept on the node, get() the
//              result, read status while held, drop the capabilities, read status again
//   forged     pass a RemoteArray capability this client implements itself as an operand
//
// Built by tests/integration/test_cxx_client.py with
//   capnp compile -oc++ pangea.capnp && g++ -std=c++17 client.cpp pangea.capnp.c++ $(pkg-config --cflags --libs capnp-rpc)

#include <capnp/ez-rpc.h>
#include <capnp/message.h>
#include <kj/async-io.h>
#include <kj/debug.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "pangea.capnp.h"

namespace {

std::string quoted(kj::StringPtr text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
      continue;
    }
    out += c;
  }
  return out + "\"";
}

// a[i][j] = (i + j) % 7 - 3, b[i][j] = (i * j) % 5 - 2: small integers, exact in float64
double entry_a(uint64_t i, uint64_t j) { return static_cast<double>((i + j) % 7) - 3.0; }
double entry_b(uint64_t i, uint64_t j) { return static_cast<double>((i * j) % 5) - 2.0; }

void fill_array(Array::Builder array, uint64_t n, double (*entry)(uint64_t, uint64_t)) {
  array.setDtype("float64");
  auto shape = array.initShape(2);
  shape.set(0, n);
  shape.set(1, n);
  std::vector<double> values(n * n);
  for (uint64_t i = 0; i < n; ++i)
    for (uint64_t j = 0; j < n; ++j) values[i * n + j] = entry(i, j);
  auto chunks = array.initChunks(1);
  auto bytes = chunks.init(0, values.size() * sizeof(double));
  std::memcpy(bytes.begin(), values.data(), bytes.size());  // little-endian on x86_64 and aarch64
}

double sum_of(Array::Reader array) {
  double total = 0;
  for (auto chunk : array.getChunks()) {
    KJ_REQUIRE(chunk.size() % sizeof(double) == 0);
    for (size_t k = 0; k < chunk.size(); k += sizeof(double)) {
      double v;
      std::memcpy(&v, chunk.begin() + k, sizeof(double));
      total += v;
    }
  }
  return total;
}

// A RemoteArray of this client's own making: the node must not take it for one of its arrays.
class ForgedArray final : public RemoteArray::Server {
 protected:
  kj::Promise<void> claim(ClaimContext context) override { return kj::READY_NOW; }
};

}  // namespace

int main(int argc, char* argv[]) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s HOST:PORT TOKEN COMMAND [N]\n", argv[0]);
    return 2;
  }
  std::string command = argv[3];
  uint64_t n = argc > 4 ? std::stoull(argv[4]) : 64;
  capnp::EzRpcClient client(argv[1]);
  auto& wait = client.getWaitScope();
  auto gate = client.getMain<Gate>();
  auto login_request = gate.loginRequest();
  login_request.setToken(argv[2]);
  auto login_promise = login_request.send();

  if (command == "pipelined") {  // a call on the promised capability, sent before the login's answer
    auto status = login_promise.getCompute().statusRequest().send().wait(wait);
    std::printf("{\"pipelined_peer_id\": %s}\n", quoted(status.getStatus().getPeerId()).c_str());
    return 0;
  }
  auto login = login_promise.wait(wait);
  if (command == "login") {
    std::printf("{\"error\": %s, \"max_message_bytes\": %llu, \"memory_budget_bytes\": %llu}\n",
                quoted(login.getError()).c_str(), (unsigned long long)login.getMaxMessageBytes(),
                (unsigned long long)login.getMemoryBudgetBytes());
    return 0;
  }
  if (login.getError().size() != 0) {
    std::printf("{\"error\": %s}\n", quoted(login.getError()).c_str());
    return 1;
  }
  auto compute = login.getCompute();
  auto held_now = [&]() {
    auto status = compute.statusRequest().send().wait(wait).getStatus();
    return std::make_pair(status.getHeldArrays(), status.getHeldBytes());
  };

  if (command == "kernels") {
    auto response = compute.kernelsRequest().send().wait(wait);
    std::string names;
    for (auto k : response.getKernels()) names += (names.empty() ? "" : ", ") + quoted(k.getName());
    std::printf("{\"kernels\": [%s]}\n", names.c_str());
  } else if (command == "status") {
    auto status = compute.statusRequest().send().wait(wait).getStatus();
    std::printf("{\"peer_id\": %s, \"version\": %s, \"memory_budget_bytes\": %llu}\n",
                quoted(status.getPeerId()).c_str(), quoted(status.getVersion()).c_str(),
                (unsigned long long)status.getMemoryBudgetBytes());
  } else if (command == "matmul" || command == "bad") {
    auto request = compute.submitRequest();
    auto task = request.initTask();
    task.setKernel("matmul");
    task.setPlacement("local");
    auto operands = task.initOperands(2);
    fill_array(operands[0], n, entry_a);
    fill_array(operands[1], command == "bad" ? n + 1 : n, entry_b);
    auto response = request.send().wait(wait);
    auto result = response.getResult();
    if (result.getErrorKind().size() != 0) {
      std::printf("{\"error_kind\": %s, \"error_message\": %s}\n", quoted(result.getErrorKind()).c_str(),
                  quoted(result.getErrorMessage()).c_str());
      return 0;
    }
    auto out = result.getOutputs()[0];
    std::printf("{\"dtype\": %s, \"rows\": %llu, \"sum\": %.1f, \"ran_on\": %s}\n", quoted(out.getDtype()).c_str(),
                (unsigned long long)out.getShape()[0], sum_of(out), quoted(result.getRanOn()).c_str());
  } else if (command == "handle") {
    auto before = held_now();
    std::pair<uint32_t, uint64_t> held;
    double total = 0;
    std::string dtype;
    uint64_t nbytes = 0;
    {  // every reference to the capabilities lives in this scope: the responses and the handles
      auto put = compute.submitRequest();
      auto put_task = put.initTask();
      put_task.setKernel("copy");
      put_task.setPlacement("local");
      put_task.setKeep(true);
      fill_array(put_task.initOperands(1)[0], n, entry_a);
      auto put_response = put.send().wait(wait);
      auto put_result = put_response.getResult();
      KJ_REQUIRE(put_result.getErrorKind().size() == 0, put_result.getErrorMessage());
      RemoteArray::Client handle = put_result.getKept()[0];
      auto info = handle.infoRequest().send().wait(wait);
      dtype = info.getDtype();
      nbytes = info.getNbytes();
      // the handle as both operands of a second task, whose result is kept too
      auto add = compute.submitRequest();
      auto add_task = add.initTask();
      add_task.setKernel("add");
      add_task.setPlacement("local");
      add_task.setKeep(true);
      add_task.initArrays(1).set(0, handle);
      auto add_operands = add_task.initOperands(2);
      for (int k = 0; k < 2; ++k) {
        add_operands[k].setDtype(info.getDtype());
        add_operands[k].setShape(info.getShape());
        add_operands[k].setHeld(1);
      }
      auto add_response = add.send().wait(wait);
      auto add_result = add_response.getResult();
      KJ_REQUIRE(add_result.getErrorKind().size() == 0, add_result.getErrorMessage());
      RemoteArray::Client twice = add_result.getKept()[0];
      auto got = twice.getRequest().send().wait(wait);
      KJ_REQUIRE(got.getErrorKind().size() == 0, got.getErrorMessage());
      total = sum_of(got.getArray());
      held = held_now();
    }
    auto after = held_now();
    for (int i = 0; i < 50 && after.first != before.first; ++i) {  // the Release crosses the connection
      client.getIoProvider().getTimer().afterDelay(100 * kj::MILLISECONDS).wait(wait);
      after = held_now();
    }
    std::printf(
        "{\"dtype\": %s, \"nbytes\": %llu, \"sum\": %.1f, \"held_before\": %u, \"held_while\": %u, "
        "\"held_bytes_while\": %llu, \"held_after\": %u, \"held_bytes_after\": %llu}\n",
        quoted(dtype.c_str()).c_str(), (unsigned long long)nbytes, total, before.first, held.first,
        (unsigned long long)held.second, after.first, (unsigned long long)after.second);
  } else if (command == "forged") {
    RemoteArray::Client forged = kj::heap<ForgedArray>();
    auto request = compute.submitRequest();
    auto task = request.initTask();
    task.setKernel("copy");
    task.setPlacement("local");
    task.initArrays(1).set(0, forged);
    auto operand = task.initOperands(1)[0];
    operand.setDtype("float64");
    auto shape = operand.initShape(2);
    shape.set(0, 4);
    shape.set(1, 4);
    operand.setHeld(1);
    auto response = request.send().wait(wait);
    auto result = response.getResult();
    std::printf("{\"error_kind\": %s, \"error_message\": %s}\n", quoted(result.getErrorKind()).c_str(),
                quoted(result.getErrorMessage()).c_str());
  } else {
    std::fprintf(stderr, "unknown command %s\n", command.c_str());
    return 2;
  }
  return 0;
}
