// Bindings of the LSTM over time (rnn.h): lstm_forward / lstm_backward for the autograd op in
// python/fastppo/recurrent.py. Addresses are Python ints (torch's data_ptr(); 0 for "none");
// recurrent.py checks shapes, dtypes and devices, the checks here only guard the C++.
#include <cstdint>
#include <string>

#include "bindings_common.h"
#include "rnn.h"

namespace fastppo::bind {
namespace {

template <typename T = void>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

LstmArgs lstm_args(const std::string& dtype, int64_t T, int64_t n, int64_t F, int64_t H, std::uintptr_t x, int64_t ldx,
                   std::uintptr_t starts, std::uintptr_t w_ih, std::uintptr_t w_hh, std::uintptr_t b_ih,
                   std::uintptr_t b_hh, std::uintptr_t saved, const char* fn) {
  if (T < 1 || n < 1 || F < 1 || H < 1 || ldx < F)
    throw py::value_error(std::string("fastppo._C.") + fn + ": T, n, F, H must be >= 1 and ldx >= F, got T=" +
                          std::to_string(T) + " n=" + std::to_string(n) + " F=" + std::to_string(F) + " H=" +
                          std::to_string(H) + " ldx=" + std::to_string(ldx));
  if (x == 0 || w_ih == 0 || w_hh == 0)
    throw py::value_error(std::string("fastppo._C.") + fn + ": x, w_ih and w_hh are required");
  LstmArgs a;
  a.is_f64 = float_is_f64(dtype);
  a.T = T, a.n = n, a.F = F, a.H = H;
  a.x = ptr(x), a.ldx = ldx;
  a.starts = ptr<const uint8_t>(starts);
  a.w_ih = ptr(w_ih), a.w_hh = ptr(w_hh), a.b_ih = ptr(b_ih), a.b_hh = ptr(b_hh);
  a.saved = ptr(saved);
  return a;
}

void lstm_forward(const std::string& dtype, int64_t T, int64_t n, int64_t F, int64_t H, std::uintptr_t x, int64_t ldx,
                  std::uintptr_t starts, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t w_ih,
                  std::uintptr_t w_hh, std::uintptr_t b_ih, std::uintptr_t b_hh, std::uintptr_t out,
                  std::uintptr_t h_n, std::uintptr_t c_n, std::uintptr_t saved) {
  LstmArgs a = lstm_args(dtype, T, n, F, H, x, ldx, starts, w_ih, w_hh, b_ih, b_hh, saved, "lstm_forward");
  if (out == 0) throw py::value_error("fastppo._C.lstm_forward: out is required");
  a.h0 = ptr(h0), a.c0 = ptr(c0), a.out = ptr(out), a.h_n = ptr(h_n), a.c_n = ptr(c_n);
  py::gil_scoped_release no_gil;
  lstm_forward_cpu(a);
}

void lstm_backward(const std::string& dtype, int64_t T, int64_t n, int64_t F, int64_t H, std::uintptr_t x,
                   int64_t ldx, std::uintptr_t starts, std::uintptr_t w_ih, std::uintptr_t w_hh, std::uintptr_t saved,
                   std::uintptr_t grad_out, std::uintptr_t grad_h_n, std::uintptr_t grad_c_n, std::uintptr_t grad_x,
                   std::uintptr_t grad_h0, std::uintptr_t grad_c0, std::uintptr_t grad_w_ih,
                   std::uintptr_t grad_w_hh, std::uintptr_t grad_b_ih, std::uintptr_t grad_b_hh) {
  LstmArgs a = lstm_args(dtype, T, n, F, H, x, ldx, starts, w_ih, w_hh, 0, 0, saved, "lstm_backward");
  if (saved == 0) throw py::value_error("fastppo._C.lstm_backward: saved (the forward's) is required");
  a.grad_out = ptr(grad_out), a.grad_h_n = ptr(grad_h_n), a.grad_c_n = ptr(grad_c_n);
  a.grad_x = ptr(grad_x), a.grad_h0 = ptr(grad_h0), a.grad_c0 = ptr(grad_c0);
  a.grad_w_ih = ptr(grad_w_ih), a.grad_w_hh = ptr(grad_w_hh), a.grad_b_ih = ptr(grad_b_ih), a.grad_b_hh = ptr(grad_b_hh);
  py::gil_scoped_release no_gil;
  lstm_backward_cpu(a);
}

}  // namespace

void bind_rnn(py::module_& m) {
  m.def("lstm_saved_size", &lstm_saved_size, py::arg("rows"), py::arg("H"),
        "Elements of lstm_forward's `saved` buffer for `rows` = T * n rows of H units.");
  m.def("lstm_forward", &lstm_forward, py::arg("dtype"), py::arg("T"), py::arg("n"), py::arg("F"), py::arg("H"),
        py::arg("x"), py::arg("ldx"), py::arg("starts"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("out"), py::arg("h_n"), py::arg("c_n"),
        py::arg("saved"),
        "A one-layer LSTM over T time-major steps of n sequences on the CPU, the state reset where starts; "
        "`saved` (or 0 for inference) receives what lstm_backward reads.");
  m.def("lstm_backward", &lstm_backward, py::arg("dtype"), py::arg("T"), py::arg("n"), py::arg("F"), py::arg("H"),
        py::arg("x"), py::arg("ldx"), py::arg("starts"), py::arg("w_ih"), py::arg("w_hh"), py::arg("saved"),
        py::arg("grad_out"), py::arg("grad_h_n"), py::arg("grad_c_n"), py::arg("grad_x"), py::arg("grad_h0"),
        py::arg("grad_c0"), py::arg("grad_w_ih"), py::arg("grad_w_hh"), py::arg("grad_b_ih"), py::arg("grad_b_hh"),
        "Backward of lstm_forward: writes each gradient whose address is not 0.");
}

}  // namespace fastppo::bind
