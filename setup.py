from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

requirements = cfg.get('requirements', '').split()
dev_requirements = cfg.get('dev_requirements', '').split()
scripts = [s.strip() for s in cfg.get('console_scripts', '').splitlines() if s.strip()]

setuptools.setup(
    name=cfg['lib_name'].replace('_', '-'),
    version=cfg['version'],
    description=cfg['description'],
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    author=cfg['author'],
    author_email=cfg['author_email'],
    url=cfg['git_url'],
    project_urls={'Source': cfg['git_url']},
    keywords=cfg['keywords'].split(),
    classifiers=['Programming Language :: Python :: 3', 'Topic :: Scientific/Engineering :: Artificial Intelligence', 'Natural Language :: Chinese (Traditional)'],
    packages=setuptools.find_packages(include=['taide_ft', 'taide_ft.*']),
    include_package_data=True,
    package_data={'taide_ft': ['templates/*']},
    python_requires='>=' + cfg['min_python'],
    install_requires=requirements,
    extras_require={'dev': dev_requirements,
                    # GPU servers: CUDA builds of torch come from the user's own index
                    'gpu': ['unsloth', 'bitsandbytes', 'torchao'],  # torchao: BASE_PRECISION = fp8
                    # experiment trackers for [Training] REPORT_TO
                    'tensorboard': ['tensorboard'], 'wandb': ['wandb'], 'mlflow': ['mlflow']},
    entry_points={'console_scripts': scripts, 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
