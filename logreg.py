"""The linear probe's two fits on frozen features (common.linear_probe): the blog's own
instrument, sklearn's LogisticRegression(solver="liblinear") with its defaults, reimplemented in
torch (fit_liblinear; equal to sklearn's to the test's tolerance, without the dependency at run
time), and a scale-invariant multinomial fit on standardized features (fit_logreg)."""
import torch
import torch.nn.functional as F


def fit_liblinear(x, y, num_classes, C=1.0, tol=1e-4, max_iter=100):
    """The blog's probe, sklearn's LogisticRegression(solver="liblinear") with its defaults, on raw
    features: one-vs-rest, C=1, the intercept a penalized constant feature. Newton-CG with
    liblinear's stopping rule, all classes at once in float64; the objective is strictly convex,
    so it reaches liblinear's optimum (test_blog_probe_matches_sklearn_liblinear)."""
    def augment(q):
        return torch.cat([q.double(), torch.ones(len(q), 1, dtype=torch.float64, device=q.device)], 1)
    X, n = augment(x), len(x)
    Y = -torch.ones(n, num_classes, dtype=torch.float64, device=x.device)
    Y[torch.arange(n, device=x.device), y] = 1.0
    W = torch.zeros(X.shape[1], num_classes, dtype=torch.float64, device=x.device)
    pos = (Y > 0).sum(0).double()
    eps = tol * torch.clamp(torch.minimum(pos, n - pos), min=1) / n

    def objective(W):   # per class, (K,)
        return 0.5 * (W * W).sum(0) + C * F.softplus(-Y * (X @ W)).sum(0)
    f, g0 = objective(W), None
    for _ in range(max_iter):
        s = torch.sigmoid(-Y * (X @ W))
        grad = W - C * (X.T @ (Y * s))
        g0 = grad.norm(dim=0) if g0 is None else g0
        active = grad.norm(dim=0) > eps * g0
        if not active.any():
            break
        D = s * (1 - s)
        d = _conjugate_gradient(lambda V: V + C * (X.T @ (D * (X @ V))), -grad)
        step, slope = torch.ones_like(f), (grad * d).sum(0)
        for _ in range(30):   # halve each class's step until it decreases enough (Armijo)
            ok = objective(W + step * d) <= f + 0.01 * step * slope
            if ok.all():
                break
            step = torch.where(ok, step, step / 2)
        W = W + torch.where(active, step, torch.zeros_like(step)) * d
        f = objective(W)
    return lambda q: (augment(q) @ W).argmax(1)


def _conjugate_gradient(hv, b, rtol=0.1, max_iter=250):
    """Solves hv(d) = b for every column of b; a column stops at |residual| <= rtol |b| (liblinear's rule)."""
    d, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), (r * r).sum(0)
    stop = rtol ** 2 * rr
    for _ in range(max_iter):
        go = rr > stop
        if not go.any():
            break
        hp = hv(p)
        alpha = torch.where(go, rr / (p * hp).sum(0), torch.zeros_like(rr))
        d += alpha * p
        r -= alpha * hp
        rr_new = (r * r).sum(0)
        p = r + torch.where(go, rr_new / rr, torch.zeros_like(rr)) * p
        rr = rr_new
    return d


def fit_logreg(x, y, num_classes, l2, max_iter=100):
    """The 'standardized' probe: multinomial logistic regression (L-BFGS, l2/2 |W|^2) on
    standardized features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda q: ((q - mu) / sd @ w + b).argmax(1)
