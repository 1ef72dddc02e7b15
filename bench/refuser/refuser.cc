// The cheapest refusal gRPC core can give: a gRPC C++ callback server that answers every call,
// whatever its method, RESOURCE_EXHAUSTED without reading its message. bench/floor_bench.py
// measures its server CPU per refusal beside our front ends' (the floor under theirs).
//
//   g++ -O2 -o refuser refuser.cc $(pkg-config --cflags --libs grpc++)   # Debian: libgrpc++-dev
//   ./refuser PORT
#include <grpcpp/grpcpp.h>
#include <grpcpp/generic/async_generic_service.h>  // CallbackGenericService (gRPC 1.51)

#include <string>

namespace {

class Refusal : public grpc::ServerGenericBidiReactor {
 public:
  Refusal() { Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full")); }
  void OnDone() override { delete this; }
};

class Refuser : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new Refusal;
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[1],
                           grpc::InsecureServerCredentials());
  // The same HTTP/2 windows as service/server.py: a refused call reads at most 8 KiB.
  builder.AddChannelArgument("grpc.http2.bdp_probe", 0);
  builder.AddChannelArgument("grpc.http2.lookahead_bytes", 8192);
  Refuser refuser;
  builder.RegisterCallbackGenericService(&refuser);
  auto server = builder.BuildAndStart();
  if (!server) return 1;
  server->Wait();
  return 0;
}
