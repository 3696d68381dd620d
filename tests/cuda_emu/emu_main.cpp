// One case of the CUDA kd_loss launcher, run on the CPU (emu_cuda.h): `emu DIR` reads DIR/params.txt (name value
// lines) and the inputs tests/test_cuda_emulated.py wrote as raw bytes (student.bin, teacher<k>.bin, tw.bin,
// labels.bin, sw.bin, den.bin), fills a KDCudaArgs as kd_loss_binding.cpp would, calls launch_kd_loss, and writes
// DIR/out.txt (the error, the plan, what was launched) and the outputs as raw bytes (row_loss.out, gs.out, gt<k>.out).
// Exit status: 0 launched, 3 the launcher returned an error (out.txt says which); a sanitizer or emulator failure
// aborts. `emu --misaligned-load` is the alignment check's control: the kernel's 16-byte load of a misaligned row
// must be reported by UBSan.
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "cuda/kd_loss_cuda.h"
#include "cuda/kd_loss_kernel.cuh"  // (the misaligned-load control calls its load_vec)
#include "cuda/kd_loss_plan.h"

using namespace fastdistill;
using namespace fastdistill::cuda;

namespace {

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fdemu::fail(("cannot read " + path).c_str());
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// An input in a heap block of exactly its size: ASan reports a read past its end.
const char* load(const std::string& path) {
  const std::vector<char> v = read_bytes(path);
  char* p = static_cast<char*>(std::malloc(v.empty() ? 1 : v.size()));
  std::memcpy(p, v.data(), v.size());
  return p;
}

void write_bytes(const std::string& path, const std::vector<char>& v) {
  std::ofstream(path, std::ios::binary).write(v.data(), std::streamsize(v.size()));
}

int64_t dtype_bytes(DType d) { return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2; }

int misaligned_load() {
  alignas(16) float row[12] = {};
  float out[detail::kVec];
  detail::load_vec<float>(row + 1, 0, 8, true, out);  // `whole` with an address 4 bytes past 16-byte alignment
  std::printf("misaligned load not reported\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: emu CASE_DIR | emu --misaligned-load\n");
    return 2;
  }
  const std::string dir = argv[1];
  if (dir == "--misaligned-load") return misaligned_load();
  std::map<std::string, std::string> P;
  {
    std::ifstream f(dir + "/params.txt");
    std::string key, value;
    while (f >> key >> value) P[key] = value;
  }
  const auto text = [&](const char* key) {
    if (!P.count(key)) fdemu::fail((std::string("params.txt has no ") + key).c_str());
    return P[key];
  };
  const auto get = [&](const char* key, double fallback = 0) { return P.count(key) ? std::stod(P[key]) : fallback; };
  const auto dtype = [&](const char* key) {
    const std::string d = text(key);
    if (d == "float32") return DType::Float32;
    if (d == "bfloat16") return DType::BFloat16;
    if (d == "float16") return DType::Float16;
    if (d == "float64") return DType::Float64;
    fdemu::fail(("unknown dtype " + d).c_str());
  };
  const int64_t n = int64_t(get("N")), v = int64_t(get("V"));
  const int k = int(get("K"));
  const DType sdt = dtype("student_dtype"), tdt = dtype("teacher_dtype");

  KDCudaArgs a;
  // names parsed as the bindings do (kd_params.h): no enum order repeated in the test
  std::vector<double> div_params;
  if (divergence_param_count(parse_divergence(text("divergence"))) == 1) div_params.push_back(get("w"));
  a.problem = make_kd_problem(n, v, k, text("divergence"), text("ensemble"), div_params, get("T"), get("kd_scale"),
                              get("ce"), int64_t(get("ignore_index", -100)), get("reduce") != 0);
  a.student_dtype = sdt;
  a.teacher_dtype = tdt;
  const int64_t acc = sdt == DType::Float64 ? 8 : 4;
  // rows start `off` elements into their buffers (a sliced view) and are `stride` elements apart (a padded one)
  const int64_t off = int64_t(get("off")), stride = int64_t(get("stride"));
  a.student = load(dir + "/student.bin") + off * dtype_bytes(sdt);
  a.student_stride = stride;
  for (int t = 0; t < k; ++t) {
    a.teachers[t] = load(dir + "/teacher" + std::to_string(t) + ".bin") + off * dtype_bytes(tdt);
    a.teacher_strides[t] = stride;
  }
  if (get("has_tw")) a.teacher_weights = load(dir + "/tw.bin");
  if (get("has_labels")) a.labels = reinterpret_cast<const int64_t*>(load(dir + "/labels.bin"));
  if (get("has_sw")) a.sample_weight = load(dir + "/sw.bin");
  if (get("has_den")) a.denominator = load(dir + "/den.bin");
  // outputs prefilled with 0x7F bytes (a large finite value): an element the kernel does not write is a mismatch
  std::vector<char> row_loss(size_t(n * acc), 0x7F);
  std::vector<char> gs(get("grad_s") ? size_t(n * v * dtype_bytes(sdt)) : 0, 0x7F);
  std::vector<std::vector<char>> gt(static_cast<size_t>(k));
  a.row_loss = row_loss.data();
  if (get("grad_s")) a.grad_student = gs.data();
  const auto grad_t = static_cast<int64_t>(get("grad_t"));  // bit t: teacher t's gradient
  for (int t = 0; t < k; ++t)
    if ((grad_t >> t) & 1) {
      gt[size_t(t)].assign(size_t(n * v * dtype_bytes(tdt)), 0x7F);
      a.grad_teachers[t] = gt[size_t(t)].data();
    }
  const std::string where = text("residency"), pipe = text("pipeline");
  a.residency = where == "global"  ? Residency::Global
                : where == "smem"  ? Residency::Smem
                : where == "cluster" ? Residency::Cluster
                                     : Residency::Auto;
  a.pipeline = pipe == "on" ? Pipeline::On : pipe == "off" ? Pipeline::Off : Pipeline::Auto;
  a.threads = int(get("threads"));
  a.cluster = int(get("cluster"));
  a.max_groups = int64_t(get("groups"));
  a.strict = get("strict", 1) != 0;

  fdemu::major = int(get("sm", 9));
  fdemu::max_threads = int(get("max_threads", 1024));
  fdemu::occupancy_clusters = int(get("occupancy_clusters", 33));
  fdemu::skip_sync = long(get("skip_sync"));
  fdemu::ex2_bias = float(get("ex2_bias"));
  fdemu::static_smem = int(get("static_smem", 1024));
  fdemu::skip_cluster_sync = long(get("skip_cluster_sync"));
  fdemu::last_error = cudaError_t(int(get("stale_error")));  // an earlier call's error nobody cleared

  const KDCudaConfig cfg = plan_kd_loss(a, 0);
  const cudaError_t err = launch_kd_loss(a, 0, nullptr);
  const char* dropped = forced_setting_dropped(a, cfg);
  std::ofstream o(dir + "/out.txt");
  const char* names[] = {"auto", "global", "smem", "cluster"};
  o << "err " << int(err) << "\nresidency " << names[int(cfg.residency)] << "\ncluster " << cfg.cluster << "\npipelined "
    << int(cfg.pipelined) << "\nsmem " << cfg.smem_bytes << "\nlaunches " << fdemu::launches << "\nthreads "
    << fdemu::last_threads << "\ngrid " << fdemu::last_grid << "\nlaunched_cluster " << fdemu::last_cluster
    << "\ndropped " << (dropped ? dropped : "-") << "\ncluster_syncs " << fdemu::most_cluster_syncs.load() << "\n";
  o.close();
  write_bytes(dir + "/row_loss.out", row_loss);
  if (get("grad_s")) write_bytes(dir + "/gs.out", gs);
  for (int t = 0; t < k; ++t)
    if ((grad_t >> t) & 1) write_bytes(dir + "/gt" + std::to_string(t) + ".out", gt[size_t(t)]);
  return err == cudaSuccess ? 0 : 3;
}
